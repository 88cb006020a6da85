"""Answer extraction, vote keys and grading (stopkit.answers): a table of real output shapes, the
keys votes group by, and the time limit, on the main thread and off it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from stopkit import answers
from stopkit.answers import check_answer, extract_answer, normalize_answer

# (model output, gold answer, verdict)
GRADES = [
    # the last balanced box, \fbox, nested braces
    (r"so the result is \boxed{\frac{1}{2}}.", "0.5", True),
    (r"first \boxed{3}, then corrected: \boxed{4}", "4", True),
    (r"first \boxed{3}, then corrected: \boxed{4}", "3", False),
    (r"\boxed{5} and a cut \boxed{6", "5", True),
    (r"The area is \fbox{12}.", "12", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    # GSM8K's "#### N" and "The answer is ..."
    ("She earns 9 * 8 = 72 dollars.\n#### 72", "72", True),
    ("#### 1,234", "1234", True),
    ("#### 71", "72", False),
    ("Janet sells 16 - 3 - 4 = 9 eggs. The answer is 18.", "18", True),
    ("The answer is $18 per day.", "18", True),
    ("So the final answer is: **42**", "42", True),
    ("**Final Answer:** 3.5", "7/2", True),
    ("Final Answer: The final answer is $-3$. I hope it is correct.", "-3", True),
    ("The answer is 18.", "81", False),
    ("I computed 18 but I am not sure.", "18", False),  # no answer stated: never guessed
    # fractions, decimals, percents, thousands separators
    (r"\boxed{0.50}", r"\frac{1}{2}", True),
    (r"\boxed{2/4}", r"\frac{1}{2}", True),
    (r"\boxed{-\frac{3}{6}}", "-0.5", True),
    (r"\boxed{1/3}", "0.333", False),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{40\%}", "50", False),
    (r"\boxed{1,000,000}", "1000000", True),
    (r"\boxed{1,2}", "12", False),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    (r"\boxed{45^\circ}", "45", True),
    (r"\boxed{\$1,250.50}", "1250.5", True),
    # expressions equal up to algebra
    (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2", True),
    (r"\boxed{\log_2 8}", "3", True),
    (r"\boxed{x = 7}", "7", True),
    (r"\boxed{\sin^2 x + \cos^2 x}", "1", True),
    (r"\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    (r"\boxed{x^2 + 1}", "(x-1)(x+1)", False),
    (r"\boxed{2\sqrt{3}}", r"3\sqrt{2}", False),
    # unordered lists and sets
    (r"\boxed{3, 1, 2}", r"\{1, 2, 3\}", True),
    (r"The solutions are \boxed{\{-2, 2\}}", "2, -2", True),
    (r"\boxed{1, 2}", r"\{1, 2, 3\}", False),
    # intervals (and an inequality in one variable)
    (r"\boxed{(1, 2]}", r"(1,2]", True),
    (r"\boxed{(1, 2]}", r"1 < x \le 2", True),
    (r"\boxed{x \ge 0}", r"[0, \infty)", True),
    (r"\boxed{[1, 2)}", r"(1,2]", False),
    # multiple choice (GPQA): the letter only
    ("After checking each option, the correct answer is (B).", "B", True),
    ("Therefore the correct option is C", "C", True),
    ("Answer: D) 4.2 eV", "D", True),
    (r"\boxed{\text{(A)}}", "A", True),
    ("The correct answer is (B).", "C", False),
    (r"\boxed{B}", "(B)", True),
    (r"\boxed{b}", "B", False),  # letters are capitals: math-verify alone would lower-case both
    # words
    (r"\boxed{\text{Paris}}", "paris", True),
    ("no answer at all", "5", False),
]


@pytest.mark.parametrize("text,gold,verdict", GRADES)
def test_grades(text, gold, verdict):
    assert check_answer(text, gold) is verdict


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{\sqrt{x^{2}}} end", r"\sqrt{x^{2}}"),  # last box, nested braces
        (r"\boxed{3} and a cut \boxed{4", "3"),  # unbalanced last box skipped
        (r"\fbox{7}", "7"),
        ("step 1\n#### 1,234\n", "1,234"),
        ("#### 5 first\nThe answer is 6.", "6"),  # the last anchor wins
        ("The answer is $18 per day.", "18"),
        ("The answer is 72 dollars because she sold 8.", "72"),
        ('Then write "The answer is 20".', "20"),
        ("Thus the final answer is $x^2 + 1$.\nDone", "x^2 + 1"),
        ("the correct answer is (B) since it conserves energy", "B"),
        ("The answer is 3, 4, 5.", "3, 4, 5"),  # a list is not cut to its head
        ("The answer is x = 5 because it fits.", "5"),
        ("4. So, the answer is 2 * 4 = 8 bolts.\n", "8"),  # after the last equals sign
        ("The answer is $x \\le 5$.", "x \\le 5"),
        ("The answer is x <= 5.", "x <= 5"),
        ("I will put it in \\boxed{}.\nSo, the answer is: 220", "220"),  # an empty box is no answer
        ("I computed 18 but I am not sure.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "equal_answers",
    [
        ["1/2", "0.5", r"\frac{2}{4}", r"\dfrac{1}{2}", "0.50", "$\\frac12$"],
        ["1000", "1,000", "1000.0", r"1{,}000", "+1000"],
        ["B", "(B)", r"\text{(B)}", "B) 42", "(B) 42"],
        [r"\{1, 2, 3\}", "3, 1, 2", "1,2,3", r"\{3,2,1\}"],
        [r"\{\log_2 8, y\}", r"\{3, y\}", "y, 3"],  # the elements' keys, sorted (not sympy's order)
        ["(1, 2]", r"1 < x \le 2", r"\left(1,2\right]"],
        ["(x+1)^2", "x^2+2x+1", "1 + 2x + x^2"],
        [r"2\sqrt{2}", r"\sqrt{8}", r"\sqrt{2}\cdot 2"],
        ["7", "x = 7", r"\text{7}"],
        ["Paris", r"\text{paris}", "PARIS"],
    ],
)
def test_equal_answers_share_a_vote_key(equal_answers):
    keys = {normalize_answer(a) for a in equal_answers}
    assert len(keys) == 1, keys
    key = keys.pop()
    assert isinstance(key, str) and hash(key) == hash(normalize_answer(equal_answers[0]))


def test_different_answers_keep_different_keys():
    different = [
        "1/2",
        "1/3",
        "0.333",
        "B",
        "C",
        r"\{1,2\}",
        r"\{1,2,3\}",
        "(1,2]",
        "[1,2)",
        "x^2+1",
        "x^2-1",
        r"\sqrt{2}",
        "12",
        "21",
        "paris",
        "rome",
        "-1/2",
    ]
    keys = [normalize_answer(a) for a in different]
    assert len(set(keys)) == len(keys), keys


def test_bad_input_and_checkers():
    with pytest.raises(TypeError, match="text"):
        extract_answer(3)
    with pytest.raises(TypeError, match="answer"):
        check_answer(r"\boxed{3}", 3)
    with pytest.raises(TypeError, match="answer"):
        normalize_answer(None)
    assert answers.load_checker(None) is check_answer
    assert answers.load_checker("stopkit.answers:check_answer") is check_answer
    with pytest.raises(ValueError, match="module:function"):
        answers.load_checker("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        answers.load_checker("stopkit.answers:nope")


# ---- the time limit ------------------------------------------------------------------------------
# Each of these runs for minutes in sympy; some hold the GIL in C, where only killing helps.
PATHOLOGICAL = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2^{2^{100}}}", r"\boxed{10^{10^{10}}}"]


def _timed(fn, limit: float):
    """fn()'s result and seconds, failing (not hanging) when it takes over ``limit`` seconds."""
    out = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t0 = time.perf_counter()
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still running after {limit}s: the time limit does not hold"
    return out[0], time.perf_counter() - t0


def test_pathological_answer_counts_wrong_within_the_limit():
    check_answer(r"\boxed{1}", "1")  # a checker process is up
    for text in PATHOLOGICAL:
        verdict, seconds = _timed(lambda text=text: check_answer(text, "5", timeout=1.0), 60)
        assert verdict is False
        assert seconds < 1.0 + 15, seconds  # the limit, plus starting a fresh checker process
    # the next check still works (a fresh process replaced the killed one)
    assert check_answer(r"\boxed{(x+1)^2}", "x^2+2x+1")
    # a vote key past the limit is the cleaned text
    assert normalize_answer("9^{9^{9^{10}}}", timeout=1.0) == "9^{9^{9^{10}}}"


def test_time_limit_off_the_main_thread():
    # the server and Ray actors check from worker threads, where signal-based timeouts cannot work
    cases = [
        (PATHOLOGICAL[0], "7", False),
        (r"\boxed{3, 1, 2}", r"\{1,2,3\}", True),
        (PATHOLOGICAL[1], "6", False),
        (r"\boxed{x^2 - 1}", "(x-1)(x+1)", True),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        (r"\boxed{\frac{7}{2}}", "3.5", True),
    ]
    assert threading.current_thread() is threading.main_thread()

    def run_all():
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda c: check_answer(c[0], c[1], timeout=1.5), cases))

    verdicts, _ = _timed(run_all, 120)
    assert verdicts == [c[2] for c in cases]


def test_checker_process_ends_itself_when_nobody_kills_it():
    # the process that asked died mid-call (a killed Ray worker): the checker must not spin forever
    proc = answers._CheckerProcess()
    try:
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="exited"):
            proc.call(["equal", "5", PATHOLOGICAL[0], 1.0], timeout=60)
        assert time.perf_counter() - t0 < 30
    finally:
        proc.kill()
