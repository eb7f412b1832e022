"""memdisc: Memorization Discrepancy and DSC against accumulative data poisoning."""
__version__ = "0.1.0"
