"""Model weights on disk: where a replica finds them and how they get there.

* :mod:`~rayllm_app.storage.model_source` - built-in model, S3 mirror, local folder or hub id
* :mod:`~rayllm_app.storage.s3_mirror`, :mod:`~rayllm_app.storage.s3_transfer` - the S3 mirror
* :mod:`~rayllm_app.storage.default_model` - the embedded SmolLM2 default, converted once
* :mod:`~rayllm_app.storage.tiny_model` - a tiny random Llama for tests and benchmarks
* :mod:`~rayllm_app.storage.atomic_folder` - write a folder, swap it in when complete
"""
