"""Scripts that are not benchmarks: the sm_90 ahead-of-time compile (``triton_aot``, which a test
runs), the solve's latency model (``solve_model``), the kernels under a profiler
(``profile_kernels``), the targets table (``targets``) and RESULTS.md's collector
(``collect_results``). Each runs from the repository's root as ``python -m tools.<name>``.
"""
