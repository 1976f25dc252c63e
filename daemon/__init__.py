"""imputationd: drive genotype-imputation jobs through remote imputation servers."""

__version__ = "0.1.0"
