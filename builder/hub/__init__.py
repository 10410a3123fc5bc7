"""The Hugging Face Hub: publish a dataset folder as one commit plus a tag per version, and pull it back.

- ``publish``: validate, plan (``plan``), re-render the card for the repo, commit, tag;
- ``pull``: one commit's files into ``.OUT.partial``, checked against the manifest, then renamed to ``OUT``;
- ``common``: what both share (timeouts, retries, the repo id check, what a published folder holds).

    result = publish(DatasetFolder.open("out/spa_vl"), "org/SPA-VL")
    pull("org/SPA-VL", "copy", revision=result.tag)

``huggingface_hub`` is imported when a call needs it, never by importing this package.
"""

from builder.hub.common import HubUnreachable
from builder.hub.plan import LocalFile, Plan, publishable_files
from builder.hub.publish import PublishRefused, PublishResult, publish
from builder.hub.pull import PullResult, VerifyFailed, pull, verify_manifest

__all__ = ["HubUnreachable", "LocalFile", "Plan", "PublishRefused", "PublishResult", "PullResult", "VerifyFailed",
           "publish", "publishable_files", "pull", "verify_manifest"]
