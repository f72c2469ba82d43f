"""deploy/grafana without Grafana: the generated JSON, the macro substitution, PromQL syntax.

No Grafana binary runs here; tests/integration/test_grafana_dashboards.py runs every panel's
SQL on chDB against a store a worker filled. Each test says which mistake it catches.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_alerting import promtool  # noqa: F401 (fixture)

ROOT = Path(__file__).parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("driftline_grafana_generate", GRAFANA / "generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gen = load_generator()
DASHBOARDS = {f"{d.uid}.json": d for d in (f() for f in gen.DASHBOARDS)}
S, E = 1_700_000_000, 1_700_003_600


def checked_in(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "dashboards" / name).read_text())
    return doc


def test_checked_in_dashboards_are_the_generators_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Catches: a dashboard JSON edited by hand, or the generator changed without regenerating.
    assert gen.main(["--check"]) == 0
    assert sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json")) == sorted(DASHBOARDS)
    # the check itself sees a changed file and a stray one
    for name, text in gen.render_all().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "driftline-drift.json").write_text(gen.render_all()["driftline-drift.json"].replace("p_value", "p"))
    (tmp_path / "old.json").write_text("{}")
    monkeypatch.setattr(gen, "OUT_DIR", tmp_path)
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "driftline-drift.json" in err and "old.json" in err and "overview" not in err


def test_dashboard_json_is_a_valid_grafana_model() -> None:
    # Catches: duplicate uids or panel ids, panels outside the 24-column grid or overlapping,
    # a ClickHouse target without the fields the plugin reads (editorType sql, rawSql, a
    # format matching queryType: 0 timeseries, 1 table), a panel on an undefined data source
    # variable, a variable used in SQL but not defined.
    uids = set()
    for name in DASHBOARDS:
        d = checked_in(name)
        assert d["uid"] not in uids and name == f"{d['uid']}.json"
        uids.add(d["uid"])
        assert d["schemaVersion"] == 41 and d["tags"] == ["driftline"]
        names = [v["name"] for v in d["templating"]["list"]]
        assert len(names) == len(set(names))
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not mine & cells, f"{p['title']} overlaps another panel"
            cells |= mine
            if p["type"] == "row":
                continue
            ds_var = re.fullmatch(r"\$\{(\w+)\}", p["datasource"]["uid"])
            assert ds_var and ds_var[1] in names
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"]
                if t["datasource"]["type"] == "grafana-clickhouse-datasource":
                    assert t["editorType"] == "sql" and t["rawSql"].startswith("SELECT ")
                    assert (t["queryType"], t["format"]) in {("timeseries", 0), ("table", 1)}
                    assert (t["queryType"] == "table") == (p["type"] in ("table", "stat")), p["title"]
                else:
                    assert t["expr"] and t["legendFormat"]
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                assert v["datasource"]["uid"] == "${ds_clickhouse}" and v["multi"] and v["includeAll"]
        # every ${var} of every query is a variable of this dashboard
        queries = [t.get("rawSql", "") + t.get("expr", "") for p in d["panels"] for t in p.get("targets", [])]
        queries += [v.get("query", "") for v in d["templating"]["list"]]
        queries += [a["target"]["rawSql"] for a in d["annotations"]["list"] if "target" in a]
        used = {m for q in queries for m in re.findall(r"\$\{(\w+)(?::\w+)?\}", q)}
        assert used <= set(names), used - set(names)


def test_datasource_variables_default_to_the_provisioned_uids() -> None:
    # Catches: a dashboard pointing at a uid the provisioning file does not create.
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "driftline.yaml").read_text())
    uid = {d["type"]: d["uid"] for d in ds["datasources"]}
    assert (gen.CH_UID, gen.PROM_UID) == (uid["grafana-clickhouse-datasource"], uid["prometheus"])
    overview = {v["name"]: v for v in checked_in("driftline-overview.json")["templating"]["list"]}
    assert overview["ds_clickhouse"]["current"]["value"] == uid["grafana-clickhouse-datasource"]
    assert overview["ds_prometheus"]["current"]["value"] == uid["prometheus"]


def test_expand_substitutes_macros_as_the_plugin_does() -> None:
    # The plugin's output for these (pkg/macros/macros.go of grafana/clickhouse-datasource):
    # catches a substitution that differs from what ClickHouse will be sent.
    got = gen.expand("SELECT 1 FROM t WHERE $__timeFilter(ts) AND x > $__fromTime AND x < $__toTime "
                     "AND n = $__interval_s AND a IN (${app:singlequote}) AND d = '${database}'",
                     start_s=S, end_s=E, interval_s=30, variables={"app": ["a", "it's"], "database": ["db"]})
    assert got == (f"SELECT 1 FROM t WHERE ts >= toDateTime({S}) AND ts <= toDateTime({E}) AND "
                   f"x > toDateTime({S}) AND x < toDateTime({E}) AND n = 30 AND a IN ('a','it\\'s') AND d = 'db'")
    assert gen.expand("$__interval_s", start_s=S, end_s=E, interval_s=0, variables={}) == "1"
    # anything not supported fails instead of reaching ClickHouse half substituted
    for bad, match in (("$__timeFilter_ms(ts)", "not substituted"), ("$__timeInterval(ts)", "not substituted"),
                       ("${nope:singlequote}", "has no value"), ("${app:csv}", "unsupported"),
                       ("$app", "not substituted")):
        with pytest.raises(ValueError, match=match):
            gen.expand(bad, start_s=S, end_s=E, interval_s=1, variables={"app": ["a"]})
    with pytest.raises(ValueError, match="before it starts"):
        gen.expand("1", start_s=E, end_s=S, interval_s=1, variables={})


def test_every_query_expands_completely() -> None:
    # Catches: a macro the tests cannot substitute (so it is never run on chDB) or a variable
    # the dashboard does not define.
    n = 0
    for d in DASHBOARDS.values():
        values = {v.name: ["x"] for v in d.variables} | {"database": ["driftline"]}
        for what, sql, _cols in d.sql_queries():
            out = gen.expand(sql, start_s=S, end_s=E, interval_s=60, variables=values)
            assert "$" not in out, what
            n += 1
    assert n == sum(len(d.sql_queries()) for d in DASHBOARDS.values()) > 20


def test_panel_definitions_are_validated() -> None:
    # Catches: a generator change that yields a panel Grafana cannot draw.
    with pytest.raises(ValueError, match="either sql or exprs"):
        gen.Panel("x", "timeseries")
    with pytest.raises(ValueError, match="declares its result columns"):
        gen.Panel("x", "table", sql="SELECT 1")
    with pytest.raises(ValueError, match="starts with its time column"):
        gen.Panel("x", "timeseries", sql="SELECT 1", columns=(("key", "string"), ("time", "time")))
    with pytest.raises(ValueError, match="unknown panel kind"):
        gen.Panel("x", "graph", sql="SELECT 1", columns=(("a", "number"),))


def test_promql_of_every_prometheus_panel_parses(tmp_path: Path, promtool: str) -> None:  # noqa: F811
    # Each expr, with Grafana's variables substituted, as a recording rule checked by
    # promtool (catches: unbalanced parentheses, a misspelled function, a bad selector).
    exprs = [e for d in DASHBOARDS.values() for p in d.panels for e, _ in p.exprs]
    assert len(exprs) >= 8
    rules = [{"record": f"driftline:grafana_{i}", "expr": gen.expand_promql(e, {"app": ["a.b", "c"], "model": ["m"]})}
             for i, e in enumerate(exprs)]
    # two backslashes in the PromQL string: the regex gets a\.b (one would be a parse error)
    assert r'{app=~"(a\\.b|c)", model=~"(m)"}' in rules[0]["expr"]
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in out.stdout
    rules[0]["expr"] = rules[0]["expr"].replace("rate(", "rat(", 1)
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": rules}]}))
    bad = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_expand_promql_refuses_what_it_cannot_substitute() -> None:
    # Catches: a PromQL variable or macro the promtool check would never see substituted.
    assert gen.expand_promql('x{app=~"$app"}[$__rate_interval]', {"app": ["a"]}) == 'x{app=~"(a)"}[1m]'
    with pytest.raises(ValueError, match="has no value"):
        gen.expand_promql('x{app=~"$apps"}', {"app": ["a"]})
    with pytest.raises(ValueError, match="has no value"):
        gen.expand_promql("x[$__interval]", {})
