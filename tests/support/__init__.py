"""What the tests share: throwaway servers and databases (pg, wes, hostile_server, tls_support), the daemon as a
process or in-process (daemon_harness, e2e_support, ops_support, chaos_support), and the machine's prerequisites.
pytest puts tests/ on sys.path (tests/conftest.py is there), so a test imports `from support.pg import ...`."""
