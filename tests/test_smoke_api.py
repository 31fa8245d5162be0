from support import CA, Client, assert_problem


def test_machine_enrolls_from_machine_template(machine: Client) -> None:
    key, result = machine.enroll("machine")
    assert result["status"] == "issued"
    assert "BEGIN CERTIFICATE" in result["certificate"]


def test_unknown_template_refused(machine: Client, ca: CA) -> None:
    assert_problem(machine.submit("nope", "garbage"), 400, "unknown-template")
