"""The `celeriac` command line: `celeriac -A tasks worker`, `purge`, ..."""
