"""Where data and runs live: local directories or any pyarrow filesystem URI (``s3://``, ``gs://`` ...).

``objectstore`` resolves a URI once and turns every store failure into a one-line error;
``locations`` lists a dataset on the driver; ``run_storage`` is where checkpoints go. No Ray, no torch.
"""
