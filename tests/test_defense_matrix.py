"""The defense matrix's table: an attack that did not backdoor the undefended model is not counted as defended."""
from benchmarks.defense_matrix import ATTACK_FAILED, table, verdict


def _row(attack: str, baseline_asr: float, mind_control_asr: float) -> dict:
    return {"attack": attack, "poison_rate": 0.1, "seconds": 60.0,
            "baseline": {"clean_acc": 0.66, "asr": baseline_asr, "ra": 0.6},
            "mcci": {"own": {"clean_acc": 0.63, "asr": baseline_asr, "ra": 0.5, "der": 0.49},
                     "mind_control": {"clean_acc": 0.58, "asr": mind_control_asr, "ra": 0.56, "der": 0.93}},
            "audit": {"recorded_poisoned": {"auroc": 0.99}}}


def test_verdicts_from_the_baseline_and_mind_control_asr():
    assert verdict(_row("ftrojan", 0.08, 0.18)) == ATTACK_FAILED == "attack failed on the baseline"
    assert verdict(_row("edge", 0.499, 0.0)) == ATTACK_FAILED  # a low mind-control ASR does not rescue it
    assert verdict(_row("badnets", 1.0, 0.065)) == "removed"
    assert verdict(_row("edge", 0.5, 0.10)) == "removed"
    assert verdict(_row("sig", 0.995, 0.998)) == "not removed"


def test_table_marks_a_failed_attack_and_gives_it_no_der():
    lines = table([_row("badnets", 1.0, 0.065), _row("ftrojan", 0.08, 0.05)]).splitlines()
    assert lines[0].endswith("| verdict |") and len(lines) == 2 + 6
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    der, last = header.index("DER"), header.index("verdict")
    badnets, ftrojan = cells[:3], cells[3:]
    assert [c[der] for c in badnets] == ["", "0.490", "0.930"] and badnets[2][last] == "removed"
    assert [c[der] for c in ftrojan] == ["", "", ""]  # no DER credited for a backdoor that never landed
    assert ftrojan[0][last] == ftrojan[2][last] == ATTACK_FAILED and ftrojan[1][last] == ""
    assert ftrojan[2][header.index("ASR")] == "0.050"  # the figures themselves are still shown
