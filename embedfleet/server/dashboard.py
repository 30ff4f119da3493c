"""The jobs dashboard through the server, behind the same tokens: a user sees their own jobs
and quota, an admin every user's.

``GET /dashboard`` is a static page with no data in it: the browser keeps the token the user
pastes in ``sessionStorage`` (never a cookie, never the URL) and polls ``GET /v1/dashboard``
with it as a Bearer header. ``embedfleet dashboard`` (Bokeh, on the database directly) stays
the administrator's local view.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from embedfleet import config
from embedfleet.server.auth import Caller

__all__ = ["dashboard_router"]

dashboard_router = APIRouter(tags=["dashboard"])


@dashboard_router.get("/v1/dashboard", summary="Jobs and quota for the dashboard: yours, or everyone's with admin scope")
async def dashboard_data(request: Request, who: Caller, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> dict:
    from embedfleet.server.routes import _public_job

    state = request.app.state.embedfleet
    local = str(config.get("user"))

    def collect() -> dict:
        users = [u.id for u in state.service.list_users() if u.id != local] if who.admin else [who.user]
        jobs = []
        for user in users:
            jobs.extend(state.service.list(user=user, limit=limit))
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return {
            "user": who.user,
            "admin": who.admin,
            "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "jobs": [_public_job(state, j) for j in jobs[:limit]],
            "usage": [state.service.quota(user).to_dict() for user in users],
        }

    return await run_in_threadpool(collect)


@dashboard_router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> str:
    return _PAGE


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>embedfleet jobs</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left}th{background:#f4f4f4}
.running{color:#1f77b4}.failed{color:#d62728}.succeeded{color:#2ca02c}.cancelled{color:#9467bd}.interrupted{color:#ff7f0e}
#error{color:#d62728}
</style></head>
<body>
<h2>embedfleet jobs</h2>
<form id="login"><input id="token" type="password" size="50" placeholder="token (embedfleet tokens create)" autocomplete="off">
<button>Show</button> <button type="button" id="logout">Forget token</button></form>
<p id="who"></p><p id="error"></p>
<h3>Usage today (UTC)</h3><table id="usage"></table>
<h3>Jobs</h3><table id="jobs"></table>
<script>
const cell = v => { const td = document.createElement("td"); td.textContent = v == null ? "-" : v; return td; };
function table(id, head, rows) {
  const t = document.getElementById(id); t.replaceChildren();
  const tr = document.createElement("tr");
  head.forEach(h => { const th = document.createElement("th"); th.textContent = h; tr.appendChild(th); });
  t.appendChild(tr);
  rows.forEach(r => { const row = document.createElement("tr"); r.forEach((v, i) => {
    const td = cell(v); if (i === 2 && id === "jobs") td.className = v; row.appendChild(td); }); t.appendChild(row); });
}
async function refresh() {
  const token = sessionStorage.getItem("embedfleet-token");
  if (!token) { document.getElementById("who").textContent = "Paste a token to see your jobs."; return; }
  try {
    const r = await fetch("/v1/dashboard", {headers: {"Authorization": "Bearer " + token}});
    if (!r.ok) { document.getElementById("error").textContent = r.status === 401 ? "The token was refused." : "HTTP " + r.status; return; }
    const d = await r.json();
    document.getElementById("error").textContent = "";
    document.getElementById("who").textContent = (d.admin ? "Every user's jobs (admin " : "Jobs of ") + d.user + (d.admin ? ")" : "") + ", as of " + d.generated_at;
    table("usage", ["user", "tier", "used", "reserved", "limit", "running", "waiting"],
      d.usage.map(u => [u.user, u.tier, u.used_today, u.reserved, u.daily_limit == null ? "unlimited" : u.daily_limit,
                        u.running + "/" + u.concurrent_limit, u.queued]));
    table("jobs", ["job", "user", "status", "stage", "collection", "embedded", "chunks", "partitions", "created", "error"],
      d.jobs.map(j => [j.id, j.user, j.status, j.stage, j.collection, j.embedded, j.chunks,
                       j.partitions_done + "/" + j.partitions_total, j.created_at, j.error]));
  } catch (e) { document.getElementById("error").textContent = String(e); }
}
document.getElementById("login").onsubmit = e => { e.preventDefault();
  sessionStorage.setItem("embedfleet-token", document.getElementById("token").value.trim());
  document.getElementById("token").value = ""; refresh(); };
document.getElementById("logout").onclick = () => { sessionStorage.removeItem("embedfleet-token"); location.reload(); };
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
