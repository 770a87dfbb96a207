"""Entry points above the library layers: what ``mask2former <command>`` runs."""
