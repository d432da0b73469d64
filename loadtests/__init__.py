"""Load tests of tm with locust (``make load``, ``make load-ui``): see loadtests/README.md."""
