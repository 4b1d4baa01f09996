"""What a worker does before it runs a deployed flow: find this repository on its own disk.

``deploy/prefect.yaml``'s pull step names :func:`project_directory` instead of templating
``{{ $MILS_PROJECT_DIR }}``: Prefect resolves environment placeholders when ``prefect deploy`` runs,
so the deployer's path (or nothing) would be stored in the deployment and every worker would look
there. This step reads the variable on the worker, when the flow run starts.
"""

from __future__ import annotations

import os

from mils_pipeline.errors import WorkerSetupError
from mils_pipeline.settings import settings


def project_directory() -> dict[str, str]:
    """Prefect pull step: change to ``$MILS_PROJECT_DIR`` as this worker sets it (the worker image
    sets /opt/mils-pipeline). Returns ``{"directory": ...}`` like Prefect's set_working_directory."""
    directory = settings().mils_project_dir
    if directory is None:
        raise WorkerSetupError(
            "MILS_PROJECT_DIR is not set on this worker: set it to the directory that holds this repository "
            "(flows/, deploy/) in the worker's environment (the worker image sets /opt/mils-pipeline)"
        )
    if not (directory / "flows").is_dir():
        raise WorkerSetupError(
            f"MILS_PROJECT_DIR={directory} on this worker has no flows/ directory: point it at this repository"
        )
    os.chdir(directory)
    return {"directory": str(directory)}
