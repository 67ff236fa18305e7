"""training.scrape driving unmodified praw against a fake Reddit on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fakes.reddit_server import FakeReddit  # tests/ has no __init__.py: pytest puts it on sys.path
from training.scrape import ScrapeError, scrape
from ttt.cli import main

ROOT = Path(__file__).resolve().parent.parent
N_SUBMISSIONS = 30


def conversation(i: int) -> list[dict]:
    """Four top-level comments, the first a chain six comments deep: 9 comments in all."""
    chain: dict = {"author": "deep5", "body": f"the bottom of thread {i}"}
    for depth in range(4, -1, -1):
        chain = {"author": f"deep{depth}", "body": f"level {depth} of thread {i}", "replies": [chain]}
    return [chain] + [{"author": f"user{j}", "body": f"top comment {j} on {i}"} for j in range(3)]


def texts(comments: list[dict]) -> list:
    return [(c["author"], c["body"], texts(c["replies"])) for c in comments]


def expected_texts(spec: list[dict]) -> list:
    return [(c["author"], c["body"], expected_texts(c.get("replies", []))) for c in spec]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def fake():
    # Small pages so that ~30 threads need 2 listing pages and every tree needs "more" objects.
    with FakeReddit(listing_page_size=20, comment_page_size=4, max_depth=3) as fake:
        fake.add_subreddit("AskFake")
        for i in range(N_SUBMISSIONS):
            fake.add_submission("AskFake", f"Question {i}", f"body {i}", f"op{i}", comments=conversation(i))
        yield fake


def creds(fake: FakeReddit, **overrides) -> dict:
    return {
        "client_id": fake.client_id, "client_secret": fake.client_secret,
        "user_agent": "talk-to-transformers tests", "oauth_url": fake.url, "reddit_url": fake.url,
        "progress": False, **overrides,
    }


@pytest.mark.timeout(60)
def test_scrapes_every_thread_with_expanded_comment_trees(fake, tmp_path):
    out = tmp_path / "raw.jsonl"
    summary = scrape("AskFake", out, **creds(fake))

    threads = lines(out)
    assert [t["title"] for t in threads] == [f"Question {i}" for i in range(N_SUBMISSIONS)]
    assert fake.count("listing") == 2  # 20 + 10 threads
    assert fake.count("morechildren") > 0 and fake.count("comments") > N_SUBMISSIONS  # "more" and "continue"
    for i, thread in enumerate(threads):
        assert texts(thread["comments"]) == expected_texts(conversation(i))
        assert thread["selftext"] == f"body {i}" and thread["author"] == f"op{i}"
        assert thread["subreddit"] == "AskFake" and thread["permalink"].startswith("/r/AskFake/comments/")
        assert {"id", "created_utc", "score"} <= thread.keys()
        assert {"id", "created_utc", "score"} <= thread["comments"][0].keys()
    assert summary.submissions == N_SUBMISSIONS and summary.comments == 9 * N_SUBMISSIONS
    assert summary.unexpanded == 0 and summary.skipped == 0
    assert fake.count("listing", status=429) + fake.count("comments", status=429) == 0


@pytest.mark.timeout(60)
def test_replace_more_limit_leaves_unexpanded_links(fake, tmp_path):
    summary = scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake, limit=3, replace_more_limit=0))
    assert summary.unexpanded > 0 and summary.comments < 3 * 9
    assert fake.count("morechildren") == 0


@pytest.mark.timeout(60)
def test_rerun_resumes_without_duplicates_and_with_fewer_requests(fake, tmp_path):
    out = tmp_path / "raw.jsonl"
    scrape("AskFake", out, **creds(fake, limit=10))
    assert len(lines(out)) == 10
    first_comments = fake.count("comments")

    summary = scrape("AskFake", out, **creds(fake))
    ids = [t["id"] for t in lines(out)]
    assert len(ids) == len(set(ids)) == N_SUBMISSIONS
    assert summary.skipped == 10 and summary.submissions == N_SUBMISSIONS - 10
    second_comments = fake.count("comments") - first_comments
    assert second_comments < first_comments * N_SUBMISSIONS / 10  # the first 10 threads were not fetched again

    before = len(fake.requests)
    again = scrape("AskFake", out, **creds(fake))
    assert again.submissions == 0 and again.skipped == N_SUBMISSIONS
    assert {r.route for r in fake.requests[before:]} <= {"token", "about", "listing"}


@pytest.mark.timeout(90)
def test_killed_scrape_keeps_finished_threads_and_resumes(tmp_path):
    out = tmp_path / "raw.jsonl"
    with FakeReddit(listing_page_size=20, response_delay_s=0.05) as fake:
        fake.add_subreddit("AskFake")
        for i in range(N_SUBMISSIONS):
            fake.add_submission("AskFake", f"Question {i}", "", "op", comments=conversation(i))
        kwargs = creds(fake)
        code = f"from training.scrape import scrape; scrape('AskFake', {str(out)!r}, **{kwargs!r})"
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not (out.exists() and out.read_text().count("\n") >= 5):
                assert child.poll() is None, "the scrape ended before it could be interrupted"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            child.kill()
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
        kept = [t["id"] for t in lines(out)]
        assert 5 <= len(kept) < N_SUBMISSIONS

        summary = scrape("AskFake", out, **creds(fake))
        ids = [t["id"] for t in lines(out)]
        assert len(ids) == len(set(ids)) == N_SUBMISSIONS
        assert summary.skipped == len(kept) and summary.submissions == N_SUBMISSIONS - len(kept)
        fetches = [r.path for r in fake.requests if r.route == "comments"]
        assert all(fetches.count(f"/comments/{i}") == 1 for i in kept)  # only the killed run fetched them


@pytest.mark.timeout(30)
def test_torn_last_line_is_dropped_and_that_thread_scraped_again(fake, tmp_path):
    out = tmp_path / "raw.jsonl"
    scrape("AskFake", out, **creds(fake, limit=3))
    whole = out.read_text()
    out.write_text(whole + whole.splitlines()[0][:40])  # as if killed in the middle of a write

    summary = scrape("AskFake", out, **creds(fake, limit=5))
    assert [t["title"] for t in lines(out)] == [f"Question {i}" for i in range(5)]
    assert summary.skipped == 3 and summary.submissions == 2


@pytest.mark.timeout(30)
def test_submission_ids_and_unknown_ids(fake, tmp_path):
    wanted = [sub.id for sub in fake.subreddits["askfake"].submissions[5:8]]
    summary = scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake, submission_ids=wanted + ["zzzzzz"]))
    assert [t["id"] for t in lines(tmp_path / "raw.jsonl")] == wanted
    assert summary.not_found == 1 and fake.count("listing") == 0


@pytest.mark.timeout(30)
def test_top_listing_uses_the_time_filter(tmp_path):
    with FakeReddit() as fake:
        fake.add_subreddit("AskFake")
        now = time.time()
        old = fake.add_submission("AskFake", "old", score=100, created_utc=now - 30 * 86400)
        low = fake.add_submission("AskFake", "low", score=1, created_utc=now - 3600)
        high = fake.add_submission("AskFake", "high", score=50, created_utc=now - 7200)
        scrape("AskFake", tmp_path / "week.jsonl", **creds(fake, listing="top", time_filter="week"))
        scrape("AskFake", tmp_path / "all.jsonl", **creds(fake, listing="top", time_filter="all"))
    assert [t["id"] for t in lines(tmp_path / "week.jsonl")] == [high, low]
    assert [t["id"] for t in lines(tmp_path / "all.jsonl")] == [old, high, low]


@pytest.mark.timeout(30)
def test_praw_rate_limit_is_respected(tmp_path):
    with FakeReddit(ratelimit_quota=2, ratelimit_window_s=1.0) as fake:
        fake.add_subreddit("AskFake")
        for i in range(3):
            fake.add_submission("AskFake", f"Question {i}", comments=[{"body": "an answer"}])
        scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake))
        api = [r for r in fake.requests if r.route != "token"]
        assert len(api) == 5 and all(r.status == 200 for r in api)  # about, listing, 3 threads

        # The quota is real: five requests that ignore the headers span at most two windows.
        token = requests.post(f"{fake.url}/api/v1/access_token", auth=(fake.client_id, fake.client_secret),
                              data={"grant_type": "client_credentials"}, timeout=5).json()["access_token"]
        statuses = [requests.get(f"{fake.url}/r/AskFake/about", headers={"Authorization": f"bearer {token}"},
                                 timeout=5).status_code for _ in range(5)]
        assert 429 in statuses
    assert len(lines(tmp_path / "raw.jsonl")) == 3


@pytest.mark.timeout(30)
def test_wrong_credentials_say_so_without_the_secret(fake, tmp_path):
    secret = "s3cr3t-value-that-must-not-leak"
    with pytest.raises(ScrapeError) as err:
        scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake, client_secret=secret))
    message = str(err.value)
    assert "credentials" in message and "REDDIT_CLIENT_SECRET" in message
    assert secret not in message and fake.client_id not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert fake.count("token", status=401) == 1


@pytest.mark.timeout(30)
def test_wrong_password_says_so_without_the_password(tmp_path):
    with FakeReddit(users={"alice": "right-password"}) as fake:
        fake.add_subreddit("AskFake")
        fake.add_submission("AskFake", "Question", comments=[{"body": "an answer"}])
        with pytest.raises(ScrapeError) as err:
            scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake, username="alice", password="wrong-password"))
        assert "REDDIT_PASSWORD" in str(err.value) and "wrong-password" not in str(err.value)
        scrape("AskFake", tmp_path / "raw.jsonl", **creds(fake, username="alice", password="right-password"))
    assert len(lines(tmp_path / "raw.jsonl")) == 1


@pytest.mark.timeout(30)
def test_missing_credentials_name_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("REDDIT_CLIENT_ID", raising=False)
    monkeypatch.delenv("REDDIT_CLIENT_SECRET", raising=False)
    with pytest.raises(ScrapeError, match="REDDIT_CLIENT_ID"):
        scrape("AskFake", tmp_path / "raw.jsonl", user_agent="talk-to-transformers tests")
    monkeypatch.setenv("REDDIT_CLIENT_ID", "some-id")
    with pytest.raises(ScrapeError, match="REDDIT_CLIENT_SECRET"):
        scrape("AskFake", tmp_path / "raw.jsonl", user_agent="talk-to-transformers tests")


@pytest.mark.timeout(30)
def test_cli_prints_the_error_without_a_traceback(tmp_path, monkeypatch, capsys):
    for name in ("REDDIT_CLIENT_ID", "REDDIT_CLIENT_SECRET", "REDDIT_USERNAME", "REDDIT_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["scrape", "AskFake", "--out", str(tmp_path / "raw.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ttt scrape: error: ") and "REDDIT_CLIENT_ID" in err and "Traceback" not in err


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("name", "setup", "expected"),
    [
        ("NoSuchSub", {}, "r/NoSuchSub does not exist"),
        ("Hidden", {"private": True}, "r/Hidden is private"),
        ("Gone", {"banned": True}, "r/Gone is banned"),
    ],
)
def test_unusable_subreddits_give_clear_errors(fake, tmp_path, name, setup, expected):
    if setup:
        fake.add_subreddit(name, **setup)
    with pytest.raises(ScrapeError, match=expected):
        scrape(name, tmp_path / "raw.jsonl", **creds(fake))
    assert fake.count("comments") == 0


@pytest.mark.timeout(30)
def test_unknown_subreddit_listing_redirects_to_search_like_reddit(fake):
    token = requests.post(f"{fake.url}/api/v1/access_token", auth=(fake.client_id, fake.client_secret),
                          data={"grant_type": "client_credentials"}, timeout=5).json()["access_token"]
    response = requests.get(f"{fake.url}/r/NoSuchSub/hot", headers={"Authorization": f"bearer {token}"},
                            allow_redirects=False, timeout=5)
    assert response.status_code == 302 and "/subreddits/search" in response.headers["Location"]
