"""The method, as math on arrays: reconstruction measures (GFRE, GFRD, LFRE, CKA), the
splits, progressive cumulants, and the mergeable statistics that stream them. Imports
neither Ray nor pyarrow (a test checks); the stages around it do the I/O and the scheduling.
"""

#: The reconstruction measures, in the order the tables list them.
METRICS = ("gfre", "gfrd", "lfre", "cka")
