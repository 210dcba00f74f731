"""piflow's measurement code that is not part of the library: the claims benchmark (π-ID vs DMD2, MeanFlow,
x0-regression and the teacher's own solvers, rows as data run by one driver) and the π-ID settings sweep.
`benchmarks/claims.py` is its command line; the tests put `benchmarks/` on the import path."""
