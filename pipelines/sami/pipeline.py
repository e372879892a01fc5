"""diffusers custom-pipeline entry for SAMI.

    DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline="pipelines/sami", trust_remote_code=True)

The logic lives in ``sami_adapter.pipeline``; this file only exposes that one class to diffusers'
custom-pipeline loader (which wants exactly one ``DiffusionPipeline`` subclass per file).
"""

from sami_adapter.pipeline import SAMIPipeline  # noqa: F401
