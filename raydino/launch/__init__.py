"""What is settled before a run launches, on the driver, before Ray starts.

``plan`` resolves a run's name, storage, tracking URI and data path once, with one-line errors;
``capacity`` says what a Ray cluster has and can grow to and whether a run fits it (plain dicts, no
Ray import).
"""
