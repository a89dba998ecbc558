"""A local stand-in of W&B's server, for the tests of the online path (this machine reaches no W&B server).

It answers what wandb's client (wandb-core and wandb.Api) sends: GraphQL operations by name (the
queries are the client's own, unchanged), the file stream that carries a run's history, summary and
output, and file uploads. It keeps what it is told per run, as the real server does: the history
lines by their offset in the stream (a line sent twice is stored once, at its offset), the summary,
the tags, the exit code and whether the run was marked preempting. An entity in `denied` is refused, as
W&B's server refuses a key that may not log there (403, "permission denied"); with `key_unknown`, every
request is refused as for a key the server does not know (401). A resumed run is told where its
history ends (RunResumeStatus), as the real server tells it. Artifacts (a model, a fork's wandb.Table)
go through W&B's own steps: created, their manifest and files announced, uploaded, committed.

    server = WandbServer()            # listening on 127.0.0.1, a free port
    env = server.environment()         # WANDB_BASE_URL, WANDB_API_KEY, WANDB_MODE=online
    server.runs["RUN_ID"].history      # what the server holds
    server.slow["UpsertBucket"] = 10   # it creates a run in 10 s

For wandb.Api (report.py): a project's runs, filtered by sweep or group (`Runs`), with their config,
state, tags and summary, and their history by keys (`RunSampledHistory`).

For `wandb agent SWEEP_ID` (the real agent): `server.sweeps[SWEEP_ID] = SWEEP_YAML_TEXT`, and
`server.commands.append(COMMAND)`: each agent heartbeat takes the commands queued so far, as the server
sends them ({"type": "run", "run_id": ..., "program": ..., "args": {NAME: {"value": V}}}).
"""

import gzip
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ENTITY = "tester"


@dataclass
class ServerRun:
    name: str
    project: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    sweep: str = ""
    lines: dict = field(default_factory=dict)  # offset in the history stream -> one JSON line
    summary: dict = field(default_factory=dict)
    exit_code: int | None = None
    preempting: bool = False

    @property
    def history(self) -> list[dict]:
        return [json.loads(self.lines[i]) for i in sorted(self.lines)]

    def bucket(self) -> dict:
        return {
            "id": f"run-{self.name}",
            "name": self.name,
            "displayName": self.name,
            "description": "",
            "config": json.dumps({k: {"value": v} for k, v in self.config.items()}),
            "sweepName": self.sweep or None,
            "group": self.group,
            "tags": self.tags,
            "historyLineCount": len(self.lines),
            "state": {None: "running", 0: "finished"}.get(self.exit_code, "failed"),
            "projectId": 1,
            "jobType": None,
            "commit": None,
            "readOnly": False,
            "createdAt": "2026-01-01T00:00:00",
            "heartbeatAt": "2026-01-01T00:00:00",
            "notes": None,
            "user": {"name": ENTITY, "username": ENTITY},
            "eventsLineCount": 0,
            "logLineCount": 0,
            "historyTail": json.dumps([self.lines[i] for i in sorted(self.lines)[-1:]]),
            "eventsTail": "[]",
            "summaryMetrics": json.dumps(self.summary),
            "wandbConfig": json.dumps({"t": 1}),  # the client takes a run without it for one not yet begun
            "project": {
                "id": f"project-{self.project}",
                "name": self.project,
                "entity": {"id": f"entity-{ENTITY}", "name": ENTITY},
            },
        }


def matches(run: ServerRun, filters: dict) -> bool:
    """W&B's run filters, the few wandb.Api users send: {"sweep": ID}, {"group": NAME}, and $and of them."""
    return all(
        all(matches(run, part) for part in value) if key == "$and" else getattr(run, key, None) == value
        for key, value in filters.items()
    )


class WandbServer:
    def __init__(self):
        self.runs: dict[str, ServerRun] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # every operation or path asked for, in order
        self.sessions: Counter = Counter()  # run id -> how many wandb.init opened it (each asks how it stands)
        self.sweeps: dict[str, str] = {}  # sweep id -> its configuration, as YAML text
        self.commands: list[dict] = []  # what the next agent heartbeat hands out
        # artifact id -> its name, type, aliases, metadata, files, state (PENDING, COMMITTED), uploads (name -> bytes)
        self.artifacts: dict[str, dict] = {}
        self.outage: int | None = None  # an HTTP status every request is answered with (an outage behind a gateway)
        # Entities the key may not log to: a run there is refused as W&B's server refuses it (403, PERMISSION_ERROR)
        self.denied: set[str] = set()
        self.key_unknown = False  # every GraphQL request refused as with a key W&B's server does not know (401)
        # The history a run's first session sends is lost, its summaries kept: as W&B's server stands when W&B
        # sent a row's summary, apart from the row, and the process was killed before the row went.
        self.first_history_lost = False
        self.runs_unread = False  # wandb.Api().run(PATH) finds no run: the public API failing while the run goes on
        self.slow: dict[str, float] = {}  # operation -> seconds it takes to answer (a busy server)
        server = self
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Handler,), {"server_state": server}))
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that hangs up (a killed run) is no error
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def environment(self) -> dict:
        return {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online", "WANDB_ENTITY": ENTITY}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def run(self, name: str) -> ServerRun:
        return self.runs.setdefault(name, ServerRun(name))

    # GraphQL: one answer per operation the client sends (its name is in its query text)

    def graphql(self, query: str, variables: dict) -> dict:
        found = re.search(r"(?:query|mutation)\s+(\w+)", query)
        operation = found[1] if found else ""
        self.requests.append(operation)
        time.sleep(self.slow.get(operation, 0))
        with self.lock:
            if operation == "Viewer":
                return {
                    "viewer": {
                        "id": "user-1",
                        "entity": ENTITY,
                        "username": ENTITY,
                        "email": "t@example.com",
                        "admin": False,
                        "flags": "{}",
                        "teams": {"edges": []},
                        "photoUrl": "",
                        "apiKeys": {"edges": []},
                        "userInfo": None,
                    }
                }
            if operation == "ServerFeaturesQuery":
                return {"serverInfo": {"features": []}}
            if operation == "RunResumeStatus":
                self.sessions[variables.get("name")] += 1
                run = self.runs.get(variables.get("name"))
                return {
                    "model": {
                        "id": "project-1",
                        "name": variables.get("project"),
                        "entity": {"id": f"entity-{ENTITY}", "name": ENTITY},
                        "bucket": run.bucket() if run else None,
                    }
                }
            if operation == "UpsertBucket":
                return {"upsertBucket": self.upsert(variables)}
            if operation == "CreateRunFiles":
                return {
                    "createRunFiles": {
                        "runID": f"run-{variables['run']}",
                        "uploadHeaders": [],
                        "files": [
                            {"name": name, "uploadUrl": f"{self.url}/upload/{name}"} for name in variables["files"]
                        ],
                    }
                }
            if operation == "SweepWithRuns":
                name = variables["sweep"]
                return {
                    "project": {
                        "sweep": {
                            "id": f"sweep-{name}",
                            "name": name,
                            "method": "grid",
                            "state": "RUNNING",
                            "description": "",
                            "config": self.sweeps[name],
                            "createdAt": "2026-01-01T00:00:00",
                            "heartbeatAt": None,
                            "updatedAt": None,
                            "earlyStopJobRunning": False,
                            "bestLoss": None,
                            "controller": None,
                            "scheduler": None,
                            "runs": {"edges": []},
                        }
                    }
                    if name in self.sweeps
                    else None
                }
            if operation == "CreateAgent":
                return {"createAgent": {"agent": {"id": "agent-1"}}}
            if operation == "Heartbeat":
                commands, self.commands = self.commands, []
                return {"agentHeartbeat": {"agent": {"id": variables["id"]}, "commands": json.dumps(commands)}}
            if operation == "ArtifactType":  # none of this name yet: any type may be logged under it
                return {"project": {"artifact": None}}
            if operation == "CreateArtifact":
                spec = variables["input"]
                artifact_id = f"artifact-{len(self.artifacts) + 1}"
                self.artifacts[artifact_id] = {
                    "name": spec["artifactCollectionName"],
                    "type": spec["artifactTypeName"],
                    "aliases": [a["alias"] for a in spec.get("aliases") or []],
                    "metadata": json.loads(spec.get("metadata") or "{}"),
                    "state": "PENDING",
                }
                return {
                    "createArtifact": {
                        "artifact": {
                            "id": artifact_id,
                            "state": "PENDING",
                            "artifactSequence": {"latestArtifact": None},
                        }
                    }
                }
            if operation == "CreateArtifactManifest":
                artifact_id = variables["artifactID"]
                return {
                    "createArtifactManifest": {
                        "artifactManifest": {
                            "id": f"manifest-{artifact_id}",
                            "file": {
                                "id": f"file-{artifact_id}",
                                "uploadUrl": f"{self.url}/upload/artifacts/{artifact_id}/manifest",
                                "uploadHeaders": [],
                            },
                        }
                    }
                }
            if operation == "CreateArtifactFiles":
                files = variables["input"]["artifactFiles"]
                for file in files:
                    self.artifacts[file["artifactID"]].setdefault("files", []).append(file["name"])
                return {
                    "createArtifactFiles": {
                        "files": {
                            "edges": [
                                {
                                    "node": {
                                        "storagePath": f"artifacts/{f['artifactID']}/{f['name']}",
                                        "uploadUrl": f"{self.url}/upload/artifacts/{f['artifactID']}/{f['name']}",
                                        "uploadHeaders": [],
                                        "uploadMultipartUrls": None,
                                        "artifact": {"id": f["artifactID"]},
                                    }
                                }
                                for f in files
                            ]
                        }
                    }
                }
            if operation == "CommitArtifact":
                self.artifacts[variables["artifactID"]]["state"] = "COMMITTED"
                return {"commitArtifact": {"artifact": {"id": variables["artifactID"], "digest": ""}}}
            if operation == "OrganizationCoreWeaveOrganizationID":
                return {"entity": {"organization": None}}
            if operation == "Runs":  # wandb.Api().runs(PATH, filters): one page holds them all
                filters = json.loads(variables.get("filters") or "{}")
                found = [r for r in self.runs.values() if r.project == variables["project"] and matches(r, filters)]
                return {
                    "project": {
                        "internalId": f"project-{variables['project']}",
                        "runCount": len(found),
                        "readOnly": False,
                        "runs": {
                            "edges": [{"node": run.bucket(), "cursor": run.name} for run in found],
                            "pageInfo": {"endCursor": found[-1].name if found else None, "hasNextPage": False},
                        },
                    }
                    if any(run.project == variables["project"] for run in self.runs.values())
                    else None
                }
            if operation == "RunSampledHistory":  # run.history(keys=...): the rows holding every key, each spec
                run, specs = self.runs.get(variables["name"]), [json.loads(spec) for spec in variables["specs"]]
                sampled = [
                    [{k: row[k] for k in spec["keys"]} for row in run.history if all(k in row for k in spec["keys"])]
                    for spec in specs
                ]
                return {"project": {"run": {"sampledHistory": sampled} if run else None}}
            if operation in ("QueryRunInfo", "RunState", "Run"):  # Run: wandb.Api().run(PATH)
                run = self.runs.get(variables.get("run") or variables.get("name"))
                run = None if operation == "Run" and self.runs_unread else run
                return {"project": {"run": run.bucket() if run else None}}
            return {}

    def upsert(self, variables: dict) -> dict:
        name = variables.get("name") or variables.get("id", "").removeprefix("run-")
        inserted = name not in self.runs
        run = self.run(name)
        run.project = variables.get("project") or run.project
        run.group = variables.get("groupName") or run.group
        run.sweep = variables.get("sweep") or run.sweep
        if variables.get("tags") is not None:
            run.tags = list(variables["tags"])
        if variables.get("config"):
            run.config.update(
                {k: v.get("value") if isinstance(v, dict) else v for k, v in json.loads(variables["config"]).items()}
            )
        if variables.get("summaryMetrics"):
            run.summary.update(json.loads(variables["summaryMetrics"]))
        return {"bucket": run.bucket(), "inserted": inserted}

    def file_stream(self, run_name: str, body: dict) -> None:
        self.requests.append("file_stream")
        with self.lock:
            run = self.run(run_name)
            for name, chunk in body.get("files", {}).items():
                if name == "wandb-history.jsonl" and self.first_history_lost and self.sessions[run_name] < 2:
                    continue
                if name == "wandb-history.jsonl":
                    for i, line in enumerate(chunk["content"]):
                        run.lines[chunk["offset"] + i] = line
                elif name == "wandb-summary.json" and chunk["content"]:
                    run.summary = json.loads(chunk["content"][-1])
            if body.get("preempting"):
                run.preempting = True
            if body.get("complete"):
                run.exit_code = body.get("exitcode")


class Handler(BaseHTTPRequestHandler):
    server_state: WandbServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: a test reads what it needs from the server's state
        pass

    def body(self) -> bytes:
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

    def answer(self, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        state, data = self.server_state, self.body()
        if state.outage:
            return self.answer({"error": "outage"}, state.outage)
        if self.path.startswith("/graphql"):
            request = json.loads(data or b"{}")
            variables = request.get("variables") or {}
            if state.key_unknown:
                return self.answer({"errors": [{"message": "user is not logged in"}], "data": None}, 401)
            if "UpsertBucket" in request.get("query", "") and variables.get("entity") in state.denied:
                error = {"message": "permission denied", "path": ["upsertBucket"]}
                error["extensions"] = {"code": "PERMISSION_ERROR"}
                return self.answer({"errors": [error], "data": {"upsertBucket": None}}, 403)
            self.answer({"data": state.graphql(request.get("query", ""), variables)})
        elif found := re.fullmatch(r"/files/[^/]+/[^/]+/([^/]+)/file_stream", self.path):
            state.file_stream(found[1], json.loads(data or b"{}"))
            self.answer({"exitcode": None, "limits": {}})
        else:
            state.requests.append(f"POST {self.path}")
            self.answer({})

    def do_PUT(self) -> None:
        data, state = self.body(), self.server_state
        if state.outage:
            return self.answer({"error": "outage"}, state.outage)
        state.requests.append(f"PUT {self.path}")
        if (found := re.fullmatch(r"/upload/artifacts/([^/]+)/(.+)", self.path)) and found[2] != "manifest":
            with state.lock:
                state.artifacts[found[1]].setdefault("uploads", {})[found[2]] = data
        self.answer({})

    def do_GET(self) -> None:
        if self.server_state.outage:
            return self.answer({"error": "outage"}, self.server_state.outage)
        self.server_state.requests.append(f"GET {self.path}")
        self.answer({})
