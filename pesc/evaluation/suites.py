"""Named benchmark suites: the papers' task lists and few-shot settings, as data (lm-eval task names)."""

from dataclasses import dataclass

from pesc.errors import PescError


@dataclass(frozen=True)
class SuiteTask:
    task: str  # an lm-eval task or group name
    num_fewshot: int | None  # None: the task's own default
    note: str = ""


SUITES: dict[str, tuple[SuiteTask, ...]] = {
    # Camelidae (arXiv 2401.02731), Table 2: the benchmarks and shots the paper reports.
    "camelidae": (
        SuiteTask("mmlu", 5),
        SuiteTask("gsm8k", 5),
        SuiteTask("minerva_math", 4, "MATH, 4-shot Minerva prompt"),
        SuiteTask("humaneval", 0, "pass@1; runs generated code: needs --confirm-run-unsafe-code"),
        SuiteTask("mbpp", 4, "runs generated code: needs --confirm-run-unsafe-code"),
        SuiteTask("hellaswag", 10),
        SuiteTask("nq_open", 0, "NaturalQuestions, closed-book"),
        SuiteTask("triviaqa", 0, "closed-book"),
    ),
    # LoRAMoE (arXiv 2312.09979): the world-knowledge benchmarks, closed-book QA, zero-shot.
    "loramoe-knowledge": (
        SuiteTask("triviaqa", 0, "closed-book"),
        SuiteTask("nq_open", 0, "NaturalQuestions, closed-book"),
        SuiteTask("webqs", 0, "WebQuestions, closed-book"),
    ),
}


def requested_tasks(tasks: str | None, suite: str | None, num_fewshot: int | None) -> list[SuiteTask]:
    """The (task, shots) list of `--tasks T1,T2 [--num-fewshot N]` or `--suite NAME`; None shots = the task's default."""
    if (tasks is None) == (suite is None):
        raise PescError("give either --tasks T1,T2 or --suite NAME (one of them)")
    if suite is not None:
        if suite not in SUITES:
            raise PescError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
        if num_fewshot is not None:
            raise PescError("--num-fewshot cannot be combined with --suite: the suite fixes each task's shots")
        return list(SUITES[suite])
    if num_fewshot is not None and num_fewshot < 0:
        raise PescError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise PescError("--tasks is empty: give lm-eval task names separated by commas")
    return [SuiteTask(name, num_fewshot) for name in dict.fromkeys(names)]
