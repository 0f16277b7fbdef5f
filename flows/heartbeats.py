"""A worker that dies mid-run, seen by Prefect and by MLflow.

A machine that crashes (or a worker killed with its flow run) reports nothing: its flow run would
stay RUNNING in Prefect, and its stage's MLflow run RUNNING, forever. Two mechanisms close them:

- Prefect's own, as documented ("Detect zombie flows", Prefect >= 3.1.8): deployment runs emit a
  `prefect.flow-run.heartbeat` event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (30 for the
  deployments of `prefect.yaml`, through the work pool's job variables), and a proactive automation
  sets a flow run CRASHED when no heartbeat and no final state followed its last heartbeat within
  `ZOMBIE_WITHIN_S`. A deployment run creates that automation on its server if it is missing
  (`ensure_zombie_automation`), so a fresh server needs no setup step. It matches only heartbeats
  of `trlm-pipeline` flow runs started from a deployment tagged `trlm`: flow runs elsewhere may beat
  less often (Prefect's default is 180 s) and must not be crashed by it.
- MLflow's side (`close_runs_of_ended_flow_runs`): a RUNNING MLflow run whose Prefect flow run
  (its `prefect.flow_run_id` tag) has reached a final state (CRASHED, CANCELLED, FAILED, COMPLETED)
  has no process left to finish it: the next pipeline run, on any worker, marks it KILLED with the
  reason. `close_abandoned_runs` (trlm.runs.tracking) can only do that for processes of its own
  machine; this works across machines, through the Prefect server they share.
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "trlm: crash flow runs that stopped sending heartbeats"
HEARTBEAT_FREQUENCY_S = 30  # prefect.yaml's job variables; Prefect's minimum
ZOMBIE_WITHIN_S = 3 * HEARTBEAT_FREQUENCY_S  # three missed heartbeats, as in Prefect's documentation
FLOW_NAME = "trlm-pipeline"
DEPLOYMENT_TAG = "trlm"  # every deployment of prefect.yaml carries it; its runs inherit it


def zombie_automation(within_s: int = ZOMBIE_WITHIN_S):
    """The automation of Prefect's "Detect zombie flows" guide, limited to this pipeline's deployment runs."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"Marks a {FLOW_NAME} deployment run CRASHED when its heartbeats stop for {within_s} s "
                    f"(a worker or machine that died mid-run). Created by the pipeline's first deployment run.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=[ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}),
                           ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"})],
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=f"no heartbeat for {within_s} s: its worker or machine stopped mid-run")],
    )


def ensure_zombie_automation() -> bool:
    """Create the automation on the current Prefect server unless one of that name exists; True if created."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
    zombie_automation().create()
    return True


def close_runs_of_ended_flow_runs(tracker) -> list[tuple[str, str]]:
    """Mark KILLED every RUNNING MLflow run whose Prefect flow run has ended; returns (run id, state name).

    A flow run of another Prefect server (not found on this one) is left alone."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    running = {}
    for run in tracker._search("attributes.status = 'RUNNING'", 200):
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        if flow_run_id:
            try:
                running.setdefault(UUID(flow_run_id), []).append(run)
            except ValueError:
                continue
    if not running:
        return []
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(running))))
    closed = []
    for flow_run in flow_runs:
        state = flow_run.state
        if state is None or not state.is_final():
            continue
        for run in running[flow_run.id]:
            why = f"abandoned: its Prefect flow run {flow_run.name} ({flow_run.id}) ended {state.name} while the run was RUNNING"
            tracker.client.set_tag(run.info.run_id, "trlm.error", why + (f" ({state.message})" if state.message else ""))
            tracker.client.set_terminated(run.info.run_id, "KILLED")
            closed.append((run.info.run_id, state.name))
    return closed
