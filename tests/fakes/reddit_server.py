"""A local fake Reddit for end-to-end tests of the scraper.

Speaks Reddit's HTTP API on 127.0.0.1 (ephemeral port) from an aiohttp server in a background
thread, so the synchronous, unmodified praw can talk to it::

    with FakeReddit() as fake:
        fake.add_subreddit("python")
        fake.add_submission("python", "Title", "text", "alice", comments=[
            {"author": "bob", "body": "hi there", "replies": [{"author": "alice", "body": "hello"}]},
        ])
        reddit = praw.Reddit(client_id=fake.client_id, client_secret=fake.client_secret,
                             user_agent="tests by u/me", oauth_url=fake.url, reddit_url=fake.url)

Implemented: ``POST /api/v1/access_token`` (HTTP basic client credentials; ``password`` grant),
``/r/{sub}/about``, ``/r/{sub}/hot|new|top`` (``t``, ``limit`` capped at 100, ``after``),
``/comments/{id}`` and ``/comments/{id}/_/{comment}`` (comment pages truncated with ``more``
objects, "continue this thread" below ``max_depth``), ``POST /api/morechildren``.
Errors have Reddit's shapes: bad client credentials -> 401; unknown subreddit -> 404 on
``about`` and a 302 to ``/subreddits/search`` on listings; private -> 403 ``reason: private``;
banned -> 404 ``reason: banned``. Every request is recorded in ``requests``; rate-limit headers
follow a fixed window and a request over the quota gets 429, as on Reddit.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BasicAuth, web

_TIME_FILTERS = {"hour": 3600, "day": 86400, "week": 7 * 86400, "month": 31 * 86400, "year": 366 * 86400}
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    digits = ""
    while n:
        n, r = divmod(n, 36)
        digits = _BASE36[r] + digits
    return digits or "0"


@dataclass
class FakeComment:
    id: str
    author: str
    body: str
    score: int
    created_utc: float
    replies: list[FakeComment] = field(default_factory=list)

    def walk(self):
        """This comment and all its descendants, parents before children."""
        yield self
        for reply in self.replies:
            yield from reply.walk()


@dataclass
class FakeSubmission:
    id: str
    subreddit: str
    title: str
    selftext: str
    author: str
    score: int
    created_utc: float
    comments: list[FakeComment] = field(default_factory=list)


@dataclass
class FakeSubreddit:
    name: str
    private: bool = False
    banned: bool = False
    submissions: list[FakeSubmission] = field(default_factory=list)  # in "hot" order


@dataclass
class RecordedRequest:
    method: str
    route: str  # "token", "about", "listing", "comments", "morechildren", "unknown"
    path: str
    query: dict[str, str]
    status: int


class FakeReddit:
    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",
        users: dict[str, str] | None = None,
        listing_page_size: int = 100,
        comment_page_size: int = 200,
        max_depth: int = 10,
        ratelimit_quota: int = 10_000,
        ratelimit_window_s: float = 1.0,
        response_delay_s: float = 0.0,
    ):
        self.client_id, self.client_secret = client_id, client_secret
        self.users = dict(users or {})  # username -> password, for the "password" grant
        self.listing_page_size = listing_page_size  # Reddit's cap on a listing's ``limit``
        self.comment_page_size = comment_page_size  # comments shown before a "more" object
        self.max_depth = max_depth  # replies deeper than this become "continue this thread"
        self.ratelimit_quota, self.ratelimit_window_s = ratelimit_quota, ratelimit_window_s
        self.response_delay_s = response_delay_s  # slows API answers, to interrupt a scrape
        self.subreddits: dict[str, FakeSubreddit] = {}
        self.submissions: dict[str, FakeSubmission] = {}
        self.requests: list[RecordedRequest] = []
        self.tokens: set[str] = set()
        self._ids = itertools.count(36**4)
        self._created = itertools.count()
        self._window = (0, 0)  # (window index, requests used in it)
        self._started_at = time.monotonic()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeReddit:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._dispatch)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-reddit", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Reddit did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._runner = None

    def __enter__(self) -> FakeReddit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- content ---------------------------------------------------------------------------
    def add_subreddit(self, name: str, private: bool = False, banned: bool = False) -> FakeSubreddit:
        sub = FakeSubreddit(name=name, private=private, banned=banned)
        self.subreddits[name.lower()] = sub
        return sub

    def add_submission(
        self,
        sub: str,
        title: str,
        selftext: str = "",
        author: str = "op",
        comments: list[dict] = (),
        *,
        score: int = 1,
        created_utc: float | None = None,
    ) -> str:
        """Add a self post; ``comments`` is a tree of {"author", "body", "score"?, "replies"?}.

        Returns the submission id. Later submissions are older unless ``created_utc`` is given.
        """
        if created_utc is None:
            created_utc = time.time() - 60 * next(self._created)
        submission = FakeSubmission(
            id=self._new_id(), subreddit=self.subreddits[sub.lower()].name, title=title,
            selftext=selftext, author=author, score=score, created_utc=created_utc,
            comments=[self._make_comment(c, created_utc) for c in comments],
        )
        self.subreddits[sub.lower()].submissions.append(submission)
        self.submissions[submission.id] = submission
        return submission.id

    def _make_comment(self, spec: dict, after: float) -> FakeComment:
        created = after + 30
        return FakeComment(
            id=self._new_id(), author=spec.get("author", "someone"), body=spec["body"],
            score=spec.get("score", 1), created_utc=created,
            replies=[self._make_comment(r, created) for r in spec.get("replies", ())],
        )

    def _new_id(self) -> str:
        return _base36(next(self._ids))

    def count(self, route: str, status: int | None = None) -> int:
        """How many requests hit ``route`` (optionally with that response status)."""
        with self._lock:
            return sum(r.route == route and (status is None or r.status == status) for r in self.requests)

    # --- HTTP ------------------------------------------------------------------------------
    _ROUTES = [
        ("POST", re.compile(r"/api/v1/access_token"), "token"),
        ("GET", re.compile(r"/r/(?P<sub>[^/]+)/about"), "about"),
        ("GET", re.compile(r"/r/(?P<sub>[^/]+)/(?P<sort>hot|new|top)"), "listing"),
        ("GET", re.compile(r"/comments/(?P<id>[^/]+)(?:/_/(?P<focus>[^/]+))?"), "comments"),
        ("POST", re.compile(r"/api/morechildren"), "morechildren"),
    ]

    async def _dispatch(self, request: web.Request) -> web.Response:
        path = request.path.rstrip("/") or "/"
        route, match = "unknown", None
        for method, pattern, name in self._ROUTES:
            m = pattern.fullmatch(path)
            if m and request.method == method:
                route, match = name, m
                break
        if route == "unknown":
            response = _error(404, "Not Found")
        elif route == "token":
            response = await self._token(request)
        else:
            response = await self._api(request, route, match)
        with self._lock:
            self.requests.append(RecordedRequest(request.method, route, path, dict(request.query), response.status))
        return response

    async def _token(self, request: web.Request) -> web.Response:
        try:
            auth = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            auth = None
        if auth is None or (auth.login, auth.password) != (self.client_id, self.client_secret):
            return _error(401, "Unauthorized")
        form = await request.post()
        grant = form.get("grant_type")
        if grant == "password":
            if self.users.get(form.get("username")) != form.get("password"):
                return web.json_response({"error": "invalid_grant"})  # Reddit answers 200 here
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"})
        token = f"fake-token-{len(self.tokens) + 1}"
        self.tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": 86400, "scope": "*"})

    async def _api(self, request: web.Request, route: str, match: re.Match) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in self.tokens:
            response = _error(401, "Unauthorized")
            response.headers["www-authenticate"] = 'Bearer realm="reddit", error="invalid_token"'
            return response
        headers, over_quota = self._ratelimit()
        if over_quota:
            response = _error(429, "Too Many Requests")
        else:
            if self.response_delay_s:
                await asyncio.sleep(self.response_delay_s)
            raw = request.query.get("raw_json") == "1"
            if route == "about":
                response = self._about(match["sub"])
            elif route == "listing":
                response = self._listing(match["sub"], match["sort"], request.query, raw)
            elif route == "comments":
                response = self._comments(match["id"], match["focus"], request.query, raw)
            else:
                response = self._morechildren(await request.post(), raw)
        response.headers.update(headers)
        return response

    def _ratelimit(self) -> tuple[dict[str, str], bool]:
        """Reddit's headers for a fixed window of ``ratelimit_window_s`` seconds."""
        with self._lock:
            elapsed = time.monotonic() - self._started_at
            window = int(elapsed // self.ratelimit_window_s)
            used = self._window[1] if self._window[0] == window else 0
            over_quota = used >= self.ratelimit_quota
            if not over_quota:
                used += 1
            self._window = (window, used)
        reset = math.ceil((window + 1) * self.ratelimit_window_s - elapsed)
        return {
            "x-ratelimit-used": str(used),
            "x-ratelimit-remaining": f"{float(self.ratelimit_quota - used):.1f}",
            "x-ratelimit-reset": str(reset),
        }, over_quota

    # --- endpoints -------------------------------------------------------------------------
    def _subreddit_error(self, name: str, listing: bool) -> web.Response | None:
        sub = self.subreddits.get(name.lower())
        if sub is None:
            if listing:  # Reddit sends unknown names to the subreddit search
                return web.Response(status=302, headers={"Location": f"{self.url}/subreddits/search.json?q={name}"})
            return _error(404, "Not Found")
        if sub.banned:
            return _error(404, "Not Found", reason="banned")
        if sub.private:
            return _error(403, "Forbidden", reason="private")
        return None

    def _about(self, name: str) -> web.Response:
        if (error := self._subreddit_error(name, listing=False)) is not None:
            return error
        sub = self.subreddits[name.lower()]
        return web.json_response({"kind": "t5", "data": {
            "id": _base36(sum(map(ord, sub.name))), "name": f"t5_{sub.name.lower()}",
            "display_name": sub.name, "display_name_prefixed": f"r/{sub.name}", "title": sub.name,
            "subreddit_type": "public", "subscribers": 1000, "public_description": "",
            "created_utc": 1_200_000_000.0, "url": f"/r/{sub.name}/", "over18": False,
        }})

    def _listing(self, name: str, sort: str, query: Any, raw: bool) -> web.Response:
        if (error := self._subreddit_error(name, listing=True)) is not None:
            return error
        items = list(self.subreddits[name.lower()].submissions)
        if sort == "new":
            items.sort(key=lambda s: s.created_utc, reverse=True)
        elif sort == "top":
            span = _TIME_FILTERS.get(query.get("t", "day"))
            if span is not None:
                items = [s for s in items if s.created_utc >= time.time() - span]
            items.sort(key=lambda s: s.score, reverse=True)
        after = query.get("after")
        if after:
            ids = [f"t3_{s.id}" for s in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        limit = max(1, min(int(query.get("limit", 25)), self.listing_page_size))
        page = items[:limit]
        return web.json_response({"kind": "Listing", "data": {
            "after": f"t3_{page[-1].id}" if len(items) > limit else None, "before": None,
            "dist": len(page), "modhash": None, "geo_filter": "",
            "children": [self._submission_thing(s, raw) for s in page],
        }})

    def _comments(self, link: str, focus: str | None, query: Any, raw: bool) -> web.Response:
        submission = self.submissions.get(link)
        if submission is None:
            return _error(404, "Not Found")
        if (error := self._subreddit_error(submission.subreddit, listing=False)) is not None:
            return error
        budget = [max(1, min(int(query.get("limit", self.comment_page_size)), self.comment_page_size))]
        if focus is None:
            things = self._forest(submission, submission.comments, f"t3_{link}", 0, budget, raw)
        else:
            found = [(c, p) for top in submission.comments for c, p in _with_parents(top, f"t3_{link}")
                     if c.id == focus]
            if not found:
                return _error(404, "Not Found")
            comment, parent = found[0]
            budget[0] -= 1
            things = [self._comment_thing(submission, comment, parent, 0, budget, raw)]
        return web.json_response([
            _listing([self._submission_thing(submission, raw)]),
            _listing(things),
        ])

    def _morechildren(self, form: Any, raw: bool) -> web.Response:
        submission = self.submissions.get(str(form.get("link_id", "")).removeprefix("t3_"))
        if submission is None:
            return _error(404, "Not Found")
        wanted = set(str(form.get("children", "")).split(","))
        things = []
        for top in submission.comments:  # flat, parents before children, as Reddit answers
            for comment, parent in _with_parents(top, f"t3_{submission.id}"):
                if comment.id in wanted:
                    data = self._comment_data(submission, comment, parent, depth=0, raw=raw)
                    data["replies"] = ""
                    things.append({"kind": "t1", "data": data})
        return web.json_response({"json": {"errors": [], "data": {"things": things}}})

    # --- rendering -------------------------------------------------------------------------
    def _forest(self, submission, comments, parent_name, depth, budget, raw) -> list[dict]:
        things = []
        for i, comment in enumerate(comments):
            if budget[0] <= 0:
                hidden = [c.id for rest in comments[i:] for c in rest.walk()]
                things.append({"kind": "more", "data": {
                    "count": len(hidden), "name": f"t1_{hidden[0]}", "id": hidden[0],
                    "parent_id": parent_name, "depth": depth, "children": hidden,
                }})
                break
            budget[0] -= 1
            things.append(self._comment_thing(submission, comment, parent_name, depth, budget, raw))
        return things

    def _comment_thing(self, submission, comment, parent_name, depth, budget, raw) -> dict:
        data = self._comment_data(submission, comment, parent_name, depth, raw)
        name = f"t1_{comment.id}"
        if not comment.replies:
            data["replies"] = ""
        elif depth >= self.max_depth:  # "continue this thread"
            data["replies"] = _listing([{"kind": "more", "data": {
                "count": 0, "name": "t1__", "id": "_", "parent_id": name, "depth": depth + 1, "children": [],
            }}])
        else:
            data["replies"] = _listing(self._forest(submission, comment.replies, name, depth + 1, budget, raw))
        return {"kind": "t1", "data": data}

    def _comment_data(self, submission, comment, parent_name, depth, raw) -> dict:
        return {
            "id": comment.id, "name": f"t1_{comment.id}", "parent_id": parent_name,
            "link_id": f"t3_{submission.id}", "author": comment.author,
            "body": comment.body if raw else _escape(comment.body), "score": comment.score,
            "ups": comment.score, "created_utc": comment.created_utc, "depth": depth,
            "subreddit": submission.subreddit, "stickied": False, "distinguished": None,
            "permalink": f"/r/{submission.subreddit}/comments/{submission.id}/_/{comment.id}/",
        }

    def _submission_thing(self, s: FakeSubmission, raw: bool) -> dict:
        text = (lambda t: t) if raw else _escape
        return {"kind": "t3", "data": {
            "id": s.id, "name": f"t3_{s.id}", "title": text(s.title), "selftext": text(s.selftext),
            "author": s.author, "score": s.score, "ups": s.score, "created_utc": s.created_utc,
            "subreddit": s.subreddit, "subreddit_name_prefixed": f"r/{s.subreddit}",
            "num_comments": sum(1 for top in s.comments for _ in top.walk()),
            "permalink": f"/r/{s.subreddit}/comments/{s.id}/{_slug(s.title)}/",
            "url": f"https://www.reddit.com/r/{s.subreddit}/comments/{s.id}/{_slug(s.title)}/",
            "is_self": True, "domain": f"self.{s.subreddit}", "over_18": False, "stickied": False,
        }}


def _with_parents(comment: FakeComment, parent_name: str):
    yield comment, parent_name
    for reply in comment.replies:
        yield from _with_parents(reply, f"t1_{comment.id}")


def _listing(children: list[dict]) -> dict:
    return {"kind": "Listing", "data": {"after": None, "before": None, "dist": None, "modhash": None,
                                        "geo_filter": "", "children": children}}


def _error(status: int, message: str, reason: str | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message, "error": status}
    if reason:
        body["reason"] = reason
    return web.json_response(body, status=status)


def _escape(text: str) -> str:
    """What Reddit sends without ``raw_json=1``: &, < and > as HTML entities."""
    return html.escape(text, quote=False)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:50] or "_"
