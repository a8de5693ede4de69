"""Batch generation: many jobs (prompt + ``generate`` settings) from a JSON Lines or CSV file, run in
this process or on a Ray cluster, each job's image named by its content and recorded in a manifest.

* :mod:`.jobs` reads and checks the prompts file (every line before any work);
* :mod:`.manifest` writes the images and ``manifest.jsonl`` and knows what is done;
* :mod:`.worker` holds the models and runs jobs (no Ray in it);
* :mod:`.local` runs them in this process, :mod:`.ray_runner` on Ray actors;
* :mod:`.progress` is the one tqdm bar over all jobs.

A layer above :mod:`wuerstchen.pipeline.cascade`: nothing in the core imports it.
"""
