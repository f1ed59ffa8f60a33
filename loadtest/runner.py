"""One run of a scenario, start to finish: make the requests, drive them, summarize, write the outputs."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from loadtest.client import LoadDriver, LoadResult, RequestRecord
from loadtest.plots import plot_run
from loadtest.prompts import RequestFactory, open_loop_plan
from loadtest.report import build_result, markdown_summary, write_json
from loadtest.scenario import Scenario


async def drive(scenario: Scenario, tokenizer, *, target: str,
                on_start: Callable[[int | None], None] = lambda total: None,
                on_record: Callable[[RequestRecord], None] | None = None, tls=None) -> LoadResult:
    """Send the scenario's requests to `target`. Open-loop requests are all made (tokenized) before the clock
    starts; closed-loop ones as workers need them. `on_start(total)` gets the number of requests when known."""
    factory = RequestFactory(scenario, tokenizer)
    driver = LoadDriver(target, model=scenario.model, timeout_s=scenario.timeout_s, on_record=on_record, tls=tls)
    if scenario.arrival.is_open_loop:
        specs = open_loop_plan(scenario, factory)
        on_start(len(specs))
        return await driver.run_open_loop(specs)
    on_start(scenario.num_requests)
    return await driver.run_closed_loop(factory.make, concurrency=scenario.arrival.concurrency,
                                        num_requests=scenario.num_requests, duration_s=scenario.duration_s)


def run_scenario(scenario: Scenario, tokenizer, *, target: str, output_dir: Path, progress=None, tls=None) -> dict:
    """Run `scenario` against `target` and write result.json, summary.md and the plots to `output_dir`.

    `progress` (loadtest.progress.RunProgress or None) shows requests as they end. Returns the result dict.
    Interrupted (Ctrl-C), the requests that ended so far are still written, with `"interrupted": true`, and the
    KeyboardInterrupt goes on to the caller.
    """
    ended: list[RequestRecord] = []

    def on_record(record: RequestRecord) -> None:
        ended.append(record)
        if progress:
            progress.advance(record)

    start = time.perf_counter()
    try:
        load = asyncio.run(drive(scenario, tokenizer, target=target,
                                 on_start=progress.start if progress else (lambda total: None), on_record=on_record,
                                 tls=tls))
    except KeyboardInterrupt:
        # asyncio.run cancelled the requests in flight: they are not counted, as if never sent.
        load = LoadResult(sorted(ended, key=lambda r: r.index), time.perf_counter() - start)
        result = {**build_result(scenario, load, target=target), "interrupted": True}
        write_outputs(result, load, scenario, output_dir)
        raise
    result = build_result(scenario, load, target=target)
    write_outputs(result, load, scenario, output_dir)
    return result


def write_outputs(result: dict, load: LoadResult, scenario: Scenario, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "result.json", result)
    (output_dir / "summary.md").write_text(markdown_summary(result))
    plot_run(load.records, scenario.slo, output_dir)
