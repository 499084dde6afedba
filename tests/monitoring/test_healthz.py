"""GET /healthz: liveness, with no dependency checks."""

from django.test import Client


def test_liveness_answers_without_touching_the_database() -> None:
    # No django_db marker: any database query would fail the test.
    response = Client().get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
