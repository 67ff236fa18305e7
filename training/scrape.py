"""Scrape a subreddit's threads into raw JSONL with praw, resumably.

One line per submission: its fields plus the whole comment tree (``comments``, each comment
with ``replies``). Each line is flushed as soon as its thread is complete, so an interrupted
scrape keeps every finished thread, and running the same command again skips them.
praw's own rate limiting paces the requests.

`ttt scrape SUBREDDIT` runs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import praw
import prawcore
from praw.exceptions import PRAWException
from praw.models import Comment, Submission
from tqdm import tqdm

ENV_CLIENT_ID = "REDDIT_CLIENT_ID"
ENV_CLIENT_SECRET = "REDDIT_CLIENT_SECRET"
ENV_USERNAME = "REDDIT_USERNAME"
ENV_PASSWORD = "REDDIT_PASSWORD"
DEFAULT_USER_AGENT = "talk-to-transformers/0.1 (persona training scraper)"
LISTINGS = ("hot", "new", "top")
TIME_FILTERS = ("all", "day", "hour", "month", "week", "year")


class ScrapeError(Exception):
    """A scrape failed for a reason a person can fix; the message says what to do."""


@dataclass
class ScrapeSummary:
    subreddit: str
    out_path: Path
    submissions: int  # threads written by this run
    comments: int  # comments in those threads
    skipped: int  # threads already in out_path from an earlier run
    not_found: int  # requested submission ids that Reddit does not have
    unexpanded: int  # "load more comments" links left when replace_more_limit ran out


def scrape(
    subreddit: str,
    out_path: Path,
    *,
    client_id: str | None = None,
    client_secret: str | None = None,
    user_agent: str = DEFAULT_USER_AGENT,
    oauth_url: str | None = None,
    reddit_url: str | None = None,
    username: str | None = None,
    password: str | None = None,
    listing: str = "hot",
    time_filter: str = "all",
    limit: int | None = 1000,
    submission_ids: Iterable[str] | None = None,
    replace_more_limit: int | None = 32,
    progress: bool = True,
) -> ScrapeSummary:
    """Append the threads of r/``subreddit`` to ``out_path`` (JSONL), skipping those already there.

    Threads come from ``listing`` (``time_filter`` applies to "top"; ``limit`` counts listing
    entries, including skipped ones), or from ``submission_ids`` when given. Missing
    ``client_id`` / ``client_secret`` are read from REDDIT_CLIENT_ID / REDDIT_CLIENT_SECRET.
    ``username`` and ``password`` switch to a script-app login. Raises ScrapeError.
    """
    if listing not in LISTINGS:
        raise ScrapeError(f"unknown listing {listing!r}: choose one of {', '.join(LISTINGS)}")
    if time_filter not in TIME_FILTERS:
        raise ScrapeError(f"unknown time filter {time_filter!r}: choose one of {', '.join(TIME_FILTERS)}")
    out_path = Path(out_path)
    reddit = _connect(client_id, client_secret, user_agent, oauth_url, reddit_url, username, password)
    ids = list(submission_ids) if submission_ids is not None else None
    summary = ScrapeSummary(subreddit, out_path, 0, 0, 0, 0, 0)
    done = _finished_ids(out_path)
    with _reddit_errors(subreddit):
        sub = reddit.subreddit(subreddit)
        sub.created_utc  # a lazy attribute: loading r/{sub}/about fails clearly for bad subreddits
        if ids is not None:
            submissions: Iterable[Submission] = (reddit.submission(i) for i in ids)
        elif listing == "top":
            submissions = sub.top(time_filter=time_filter, limit=limit)
        else:
            submissions = getattr(sub, listing)(limit=limit)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        total = len(ids) if ids is not None else limit
        with out_path.open("a", encoding="utf-8") as out, tqdm(
            total=total, unit="thread", desc=f"r/{subreddit}", disable=not progress
        ) as bar:
            for submission in submissions:
                bar.update()
                if submission.id in done:
                    summary.skipped += 1
                    continue
                try:
                    thread, unexpanded = _thread(submission, replace_more_limit)
                except prawcore.NotFound:
                    summary.not_found += 1
                    continue
                out.write(json.dumps(thread, ensure_ascii=False) + "\n")
                out.flush()
                done.add(submission.id)
                summary.submissions += 1
                summary.comments += _count(thread["comments"])
                summary.unexpanded += unexpanded
                bar.set_postfix(comments=summary.comments, skipped=summary.skipped)
    return summary


def _connect(client_id, client_secret, user_agent, oauth_url, reddit_url, username, password) -> praw.Reddit:
    client_id = client_id or os.environ.get(ENV_CLIENT_ID)
    client_secret = client_secret or os.environ.get(ENV_CLIENT_SECRET)
    if not client_id:
        raise ScrapeError(f"no Reddit client id: set {ENV_CLIENT_ID} (create an app at https://www.reddit.com/prefs/apps)")
    if not client_secret:
        raise ScrapeError(f"no Reddit client secret: set {ENV_CLIENT_SECRET}")
    if bool(username) != bool(password):
        raise ScrapeError(f"a Reddit login needs both {ENV_USERNAME} and {ENV_PASSWORD}")
    urls = {k: v for k, v in (("oauth_url", oauth_url), ("reddit_url", reddit_url)) if v}
    login = {"username": username, "password": password} if username else {}
    try:
        return praw.Reddit(
            client_id=client_id, client_secret=client_secret, user_agent=user_agent,
            check_for_updates=False, **urls, **login,
        )
    except (PRAWException, prawcore.PrawcoreException) as exc:
        raise ScrapeError(f"cannot set up the Reddit client: {exc}") from None


def _finished_ids(path: Path) -> set[str]:
    """Ids of the threads already in ``path``; a torn last line (an interrupted write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return {json.loads(line)["id"] for line in data[:end].splitlines() if line.strip()}


def _thread(submission: Submission, replace_more_limit: int | None) -> tuple[dict, int]:
    """The submission and its expanded comment tree, and how many "more" links stayed unexpanded."""
    unexpanded = submission.comments.replace_more(limit=replace_more_limit)
    thread = {
        "id": submission.id,
        "title": submission.title,
        "selftext": submission.selftext,
        "author": _name(submission.author),
        "created_utc": submission.created_utc,
        "score": submission.score,
        "permalink": submission.permalink,
        "subreddit": str(submission.subreddit),
        "comments": [_comment(c) for c in submission.comments],
    }
    return thread, len(unexpanded)


def _comment(comment: Comment) -> dict:
    return {
        "id": comment.id,
        "author": _name(comment.author),
        "body": comment.body,
        "score": comment.score,
        "created_utc": comment.created_utc,
        "replies": [_comment(reply) for reply in comment.replies],
    }


def _name(redditor) -> str:
    return "[deleted]" if redditor is None else redditor.name


def _count(comments: list[dict]) -> int:
    return sum(1 + _count(c["replies"]) for c in comments)


@contextmanager
def _reddit_errors(subreddit: str) -> Iterator[None]:
    """Turn prawcore's exceptions into ScrapeErrors a person can act on (never quoting secrets)."""
    where = f"r/{subreddit}"
    try:
        yield
    except prawcore.OAuthException:
        raise ScrapeError(
            f"Reddit rejected the login: check {ENV_USERNAME} / {ENV_PASSWORD}"
            " (the account must be a developer of the app)"
        ) from None
    except prawcore.Redirect as exc:
        if exc.path.startswith("/subreddits/search"):
            raise ScrapeError(f"{where} does not exist") from None
        raise ScrapeError(f"Reddit redirected a request to {exc.path}") from None
    except prawcore.NotFound as exc:
        if _reason(exc) == "banned":
            raise ScrapeError(f"{where} is banned") from None
        raise ScrapeError(f"{where} does not exist") from None
    except prawcore.Forbidden as exc:
        reason = _reason(exc)
        if reason in ("private", "quarantined", "gold_only"):
            raise ScrapeError(f"{where} is {reason.replace('_', '-')}: its posts cannot be read") from None
        raise ScrapeError(f"Reddit refused access to {where} (HTTP 403)") from None
    except prawcore.TooManyRequests:
        raise ScrapeError("Reddit's rate limit was exceeded: wait a while and run again (it resumes)") from None
    except prawcore.ServerError as exc:
        raise ScrapeError(
            f"Reddit is failing (HTTP {exc.response.status_code}): try again later (it resumes)"
        ) from None
    except prawcore.ResponseException as exc:
        if exc.response.status_code == 401:
            raise ScrapeError(
                f"Reddit rejected the client credentials: check {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}"
            ) from None
        raise ScrapeError(f"Reddit answered HTTP {exc.response.status_code}") from None
    except prawcore.RequestException as exc:
        raise ScrapeError(f"cannot reach Reddit: {type(exc.original_exception).__name__}") from None


def _reason(exc: prawcore.ResponseException) -> str:
    try:
        return str(exc.response.json().get("reason", ""))
    except ValueError:
        return ""
