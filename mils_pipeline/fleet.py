"""The fleet's Prefect setup for shard units: the ``mils-gpu`` limit and the zombie automation.

    python -m mils_pipeline.fleet --gpus 8                   # against $PREFECT_API_URL

- ``mils-gpu``: a global concurrency limit of one slot per GPU in the fleet. A shard unit
  (``caption_shard`` in flows/caption.py) holds one slot from before its models load until its last
  shard ends, through a lease the unit's process renews; when the process dies without releasing it
  (SIGKILL, a lost machine) the lease runs out and the server takes the slot back
  (:data:`GPU_SLOT_LEASE_SECONDS`).
- The automation :data:`ZOMBIE_AUTOMATION`: a flow run that sent a heartbeat
  (``prefect.flow-run.heartbeat``) and then neither another heartbeat nor a final state within
  ``--crash-after`` seconds is set to Crashed, so a unit whose worker died with it does not stay
  Running forever and the parent counts its shards as failed. Workers send heartbeats every
  ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (the worker image sets :data:`HEARTBEAT_SECONDS`;
  Prefect's default is 180, its minimum 30): keep ``--crash-after`` at several heartbeats, or a
  heartbeat late under load crashes a healthy run.

Both are created or updated in place, so the command is safe to rerun (e.g. with another
``--gpus`` when the fleet grows).
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import Any

import httpx
from prefect.exceptions import PrefectHTTPStatusError

GPU_LIMIT = "mils-gpu"
# Seconds a unit's mils-gpu slot is leased for; the unit's process renews it every three quarters
# of that. The server's minimum (60): a unit killed without releasing its slot gives it back within
# this plus the server's lease check (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS, 15 s).
GPU_SLOT_LEASE_SECONDS = 60.0
ZOMBIE_AUTOMATION = "mils: crash flow runs whose heartbeats stopped"
HEARTBEAT_SECONDS = 60  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in deploy/Dockerfile.gpu-worker
CRASH_AFTER_SECONDS = 300  # five of the image's heartbeats; above Prefect's default of 180 s
MIN_HEARTBEAT_SECONDS = 30  # Prefect sends heartbeats at most this often
CRASHED_MESSAGE = "no heartbeat from the flow run's process for {seconds:.0f} s: its worker or process died"


def zombie_automation(crash_after: float = CRASH_AFTER_SECONDS) -> Any:
    """The automation that sets a flow run Crashed when ``crash_after`` seconds pass after one of
    its heartbeats without another heartbeat or a final state (Prefect's documented zombie check).
    The state change is not forced: a run that did end is never turned Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if crash_after < 2 * MIN_HEARTBEAT_SECONDS:
        raise ValueError(
            f"--crash-after must be at least {2 * MIN_HEARTBEAT_SECONDS} s (two of the most frequent heartbeats "
            f"Prefect sends, every {MIN_HEARTBEAT_SECONDS} s), got {crash_after:g}"
        )
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Marks a flow run Crashed when its heartbeats stop (mils_pipeline.fleet): a worker that "
        "died with its unit leaves no one to report it.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=CRASHED_MESSAGE.format(seconds=crash_after))],
    )


def setup_fleet(gpus: int, crash_after: float = CRASH_AFTER_SECONDS) -> dict[str, Any]:
    """Create or update ``mils-gpu`` with ``gpus`` slots and the zombie automation on the Prefect
    server of ``$PREFECT_API_URL``. Returns what is there now."""
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1 (one slot per GPU in the fleet), got {gpus}")
    automation = zombie_automation(crash_after)
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        # without it Prefect would start a temporary server of its own and set that one up
        raise ValueError("PREFECT_API_URL is not set: point it at the fleet's Prefect server (http://HOST:4200/api)")

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, gpus)
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        if existing:
            automation_id = existing[0].id
            client.update_automation(automation_id, automation)
            for duplicate in existing[1:]:
                client.delete_automation(duplicate.id)
        else:
            automation_id = client.create_automation(automation)
    return {
        "limit": {"name": limit.name, "slots": limit.limit, "in_use": limit.active_slots, "active": limit.active},
        "automation": {"name": ZOMBIE_AUTOMATION, "id": str(automation_id), "crash_after": crash_after},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mils_pipeline.fleet",
        description="Set up the Prefect server of $PREFECT_API_URL for the shard-unit fleet: the mils-gpu "
        "concurrency limit and the automation that marks flow runs Crashed when their heartbeats stop. "
        "Safe to rerun.",
    )
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the fleet: the mils-gpu limit's slots")
    parser.add_argument(
        "--crash-after",
        type=float,
        default=CRASH_AFTER_SECONDS,
        help="seconds without a heartbeat after which a running flow run is set Crashed (default "
        f"{CRASH_AFTER_SECONDS}; keep it several times the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY)",
    )
    args = parser.parse_args(argv)
    try:
        done = setup_fleet(args.gpus, args.crash_after)
    except ValueError as exc:
        parser.error(str(exc))
    except (httpx.HTTPError, PrefectHTTPStatusError) as exc:
        parser.exit(
            2,
            f"{parser.prog}: the Prefect server did not take the setup: {exc}. Check that the server at "
            "PREFECT_API_URL is up and reachable\n",
        )
    limit, automation = done["limit"], done["automation"]
    print(f"{limit['name']}: {limit['slots']} slot(s), {limit['in_use']} in use")
    print(f"automation {automation['name']!r} ({automation['id']}): Crashed after {automation['crash_after']:g} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
