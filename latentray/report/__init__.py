"""The report: an HTML page, its figures and its summary, from the results tables alone."""
