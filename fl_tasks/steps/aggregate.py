"""aggregate: server-side guards, quorum, the strategy, then the commit (HEAD.json written last).

The new global is written as the next round's ``global.safetensors`` (the model that round trains
from), then ``result.json``, then ``HEAD.json``. A crash before HEAD leaves the previous model as
HEAD; a retry recomputes the same keys.
"""

from __future__ import annotations

import math

from fl_tasks.aggregation import aggregate_files
from fl_tasks.faults import crash_point
from fl_tasks.guards import check_with_spec_guards
from fl_tasks.privacy import add_gaussian_noise, clip_file, noise_stddev
from fl_tasks.steps.common import StepEnv, log, missing_update_reason, now, scratch_dir, write_result
from fl_tasks.store import ChecksumMismatch


class QuorumNotMet(RuntimeError):
    pass


def required_silos(quorum: dict, n_silos: int) -> int:
    by_count = int(quorum.get("min_silos", 1))
    by_fraction = math.ceil(float(quorum.get("min_fraction", 0.0)) * n_silos)
    return max(1, by_count, by_fraction)


def run(env: StepEnv) -> None:
    plan = env.plan()
    r = env.round
    head = env.store.get_json_or_none(env.keys.head)
    if head and head["round"] >= r:
        result = env.store.get_json(env.keys.result(r), head.get("result_sha256") if head["round"] == r else None)
        log(f"round {r} is already committed (HEAD is round {head['round']}); nothing to do")
        write_result({"round": r, "accepted": result["accepted"], "new_global": result["new_global"], "reused": True})
        return

    accepted: dict[str, dict] = {}
    rejected: dict[str, str] = {}
    with scratch_dir() as tmp:
        global_path = env.fetch(plan["input_global"]["key"], plan["input_global"]["sha256"], tmp)
        inputs = []
        sampled = plan.get("sampled", [s["name"] for s in plan["silos"]])
        for name in sampled:
            manifest = env.store.get_json_or_none(env.keys.manifest(r, name))
            if manifest is not None and manifest.get("dag_run_id") != plan["dag_run_id"]:
                manifest = None  # left over from an earlier, uncommitted attempt at this round
            verdict = env.store.get_json_or_none(env.keys.verdict(r, name))
            if manifest is None:
                rejected[name] = missing_update_reason(env, r, name)
                continue
            if verdict is not None and verdict.get("update_sha256") == manifest["sha256"] and not verdict["accepted"]:
                rejected[name] = f"rejected by the silo's validation: {verdict.get('reason')}"
                continue
            try:
                path = env.fetch(manifest["key"], manifest["sha256"], tmp)
            except ChecksumMismatch as exc:
                rejected[name] = str(exc)
                continue
            guard = check_with_spec_guards(path, global_path, manifest.get("num_examples"), plan.get("guards", {}))
            if not guard.accepted:
                rejected[name] = guard.reason
                continue
            dp = plan.get("differential_privacy")
            if dp and dp["mode"] == "server":
                clipped = tmp / f"{name}.clipped.safetensors"
                factor = clip_file(path, global_path, clipped, guard.update_norm or 0.0, dp["clipping_norm"])
                log(f"round {r}: silo {name} update norm {guard.update_norm:.4g} clipped by factor {factor:.4g}")
                path = clipped
            accepted[name] = {
                "sha256": manifest["sha256"], "num_examples": manifest["num_examples"], "update_norm": guard.update_norm
            }
            inputs.append((path, manifest["num_examples"]))
        for name, reason in rejected.items():
            log(f"round {r}: silo {name} rejected: {reason}")

        need = required_silos(plan.get("quorum", {}), len(sampled))
        if len(accepted) < need:
            message = (
                f"round {r}: only {len(accepted)} accepted update(s) ({', '.join(accepted) or 'none'}), "
                f"quorum needs {need}; HEAD stays at round {head['round'] if head else 0}"
            )
            env.store.put_json(env.keys.result(r), {
                "job": env.args.job, "round": r, "dag_run_id": plan["dag_run_id"], "committed": False,
                "reason": message, "accepted": accepted, "rejected": rejected, "input_global": plan["input_global"],
            })
            raise QuorumNotMet(message)
        strategy = plan["strategy"]
        out = tmp / "new_global.safetensors"
        # server optimiser state (FedOpt family): the previous round's, via HEAD, checksum-verified
        state_in_ref = (head or {}).get("server_state")
        state_in = env.fetch(state_in_ref["key"], state_in_ref["sha256"], tmp) if state_in_ref else None
        state_out = tmp / "server_state.safetensors"
        info = aggregate_files(
            strategy["name"], strategy.get("params", {}), inputs, out,
            global_path=global_path, state_in=state_in, state_out=state_out,
        )
        if info.get("state_reset"):
            log(f"round {r}: {info['state_reset']}")
        server_state = None
        if info["state_written"]:
            state_key = env.keys.server_state(r)
            server_state = {"key": state_key, "sha256": env.store.put_file(state_key, state_out)}
        dp = plan.get("differential_privacy")
        if dp:
            stddev = noise_stddev(dp["noise_multiplier"], dp["clipping_norm"], len(inputs))
            add_gaussian_noise(out, stddev)
            log(f"round {r}: differential privacy ({dp['mode']}-side clipping): Gaussian noise std {stddev:.4g}")
        new_key = env.keys.global_model(r + 1)
        new_sha = env.store.put_file(new_key, out)

    result = {
        "job": env.args.job,
        "round": r,
        "dag_run_id": plan["dag_run_id"],
        "committed": True,
        "sampled": sampled,
        "strategy": strategy,
        "differential_privacy": plan.get("differential_privacy"),
        "accepted": accepted,
        "rejected": rejected,
        "input_global": plan["input_global"],
        "new_global": {"key": new_key, "sha256": new_sha},
        "server_state_in": state_in_ref,
        "server_state": server_state,
        "committed_at": now(),
    }
    result_sha = env.store.put_json(env.keys.result(r), result)
    crash_point("aggregate:before-head")
    env.store.put_json(
        env.keys.head,
        {
            "job": env.args.job,
            "round": r,
            "global_key": new_key,
            "global_sha256": new_sha,
            "result_key": env.keys.result(r),
            "result_sha256": result_sha,
            "server_state": server_state,
            "dag_run_id": plan["dag_run_id"],
        },
    )
    log(
        f"round {r}: {strategy['name']} over {len(accepted)} update(s) "
        f"({', '.join(accepted)}); committed global {new_sha[:12]}"
    )
    write_result({"round": r, "accepted": accepted, "rejected": rejected, "new_global": result["new_global"]})
