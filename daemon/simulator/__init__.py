"""A simulated Cloudgene 3 imputation server (imputationserver2 app) on loopback, for `imputationd demo`,
`imputationd simulate-server` and the tests.

    with SimulatedCloudgene({"tok": "alice"}, timings=Timings(queue=0.1, run=0.1, export=0.1)) as sim:
        sim.base_url            # http://127.0.0.1:PORT  (API under /api/v2)
        sim.faults.error(502, times=3, path="/api/v2/jobs/submit")
        sim.stats()

See `server.py` for the HTTP control API (`/_sim/...`) and `faults.py` for the fault kinds.
"""

from daemon.simulator.faults import FaultRule, Faults
from daemon.simulator.model import DEFAULT_PANELS, Panel, State, Timings
from daemon.simulator.server import SimulatedCloudgene, serve
from daemon.simulator.vcf import write_sample_vcf

__all__ = [
    "DEFAULT_PANELS",
    "FaultRule",
    "Faults",
    "Panel",
    "SimulatedCloudgene",
    "State",
    "Timings",
    "serve",
    "write_sample_vcf",
]
