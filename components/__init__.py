"""One KFP component per pipeline step, each thin over the ``dfu_ml`` library.

Every module holds three things: ``run_<step>``, a plain function over local paths (or ``s3://``
URIs where a step talks to object storage); the KFP component function that calls it, named after
what the step does (its imports live in its body, because KFP ships only the function's source);
and ``main``, the same step as a command line, so that ``python -m components.<step> --help``
works inside the image.
"""
