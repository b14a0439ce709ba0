"""The operator's actions and reports, each implemented once, returning plain data: the
command line renders it as tables, the HTTP front door as JSON."""
