"""``ausd --start-condition`` (the unit's ExecCondition=): exit 1, so that
systemd skips the start instead of failing it, only while the policy file
is missing; 0 otherwise, a bad configuration included (its start fails and
says why)."""

from __future__ import annotations

from aus.agent.ausd import main


def condition(tmp_path, text: str) -> int:
    config = tmp_path / "ausd.yaml"
    config.write_text(text)
    return main(["--config", str(config), "--start-condition"])


def test_missing_policy_file_skips_the_start(tmp_path, capsys):
    assert condition(tmp_path, "policy: policy.yaml\nmode: visibility\n") == 1
    err = capsys.readouterr().err
    assert f"ausd: not starting: no policy at {tmp_path / 'policy.yaml'}" in err
    assert "systemctl start ausd" in err


def test_present_policy_file_starts(tmp_path, capsys):
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    assert condition(tmp_path, "policy: policy.yaml\n") == 0
    assert capsys.readouterr().err == ""


def test_policy_url_always_starts(tmp_path):
    (tmp_path / "credentials").touch(mode=0o600)
    assert condition(tmp_path, "policy: https://aus.example.com/api/orgs/1/bundle\n"
                               "policy_credentials: credentials\n") == 0


def test_bad_configuration_is_left_to_the_start(tmp_path, capsys):
    assert condition(tmp_path, "polcy: x\n") == 0
    assert "invalid configuration" in capsys.readouterr().err
