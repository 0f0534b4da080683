# ruff: noqa: E501 (the page, its CSS and its script are kept as written, not wrapped)
"""The HTML page, its CSS and its script, as strings: the report must be one file that opens from disk.

The script reads the JSON data block, lays the selected pass's graph out with dagre (embedded
before it, see layout.py), draws it as SVG with each fusion group collapsed into one box until
clicked, and wires up the search box, clicks (a box -> its kernel's Triton source, IR nodes and
source lines), the pass and run selectors, and sortable tables. A URL hash such as
`#run=run-0001&pass=03-fuse&kernel=NAME&expand=NAME|all&search=TEXT` selects on load (links, tests).
Errors are caught and shown in the page (and set data-errors on <body>), so a test can read them.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{TITLE}}</title>
<style>{{CSS}}</style>
</head>
<body>
<header><h1>lazygraph report</h1><span id="lg-path"></span>
<label>run <select id="lg-run"></select></label></header>
<pre id="lg-errors"></pre>
<main>
<div id="lg-headline"></div>
<section id="lg-graph-sec"><h2>graph after each pass</h2>
<div class="bar"><span id="lg-passes"></span>
<span class="tools"><span class="search"><input id="lg-search" type="search" placeholder="search: %12, kernel, model.py:40" autocomplete="off">
<ul id="lg-search-results" hidden></ul></span>
<button id="lg-expand-all" title="draw every node of every kernel">expand all</button><button id="lg-collapse-all" title="one box per kernel">collapse all</button>
<button id="lg-zoom-out" title="zoom out">&minus;</button><button id="lg-zoom-fit">fit</button>
<button id="lg-zoom-in" title="zoom in">+</button><button id="lg-text-toggle">text</button></span></div>
<div id="lg-note"></div>
<div id="lg-sections" hidden><button id="lg-prev">&larr; previous</button> <span id="lg-section"></span> <button id="lg-next">next &rarr;</button></div>
<div class="split"><div id="lg-canvas"></div><aside id="lg-detail"></aside></div>
<pre id="lg-text" hidden></pre>
</section>
<section id="lg-kernels-sec"><h2>kernels</h2><div id="lg-kernels"></div></section>
<section id="lg-fusion-sec"><h2>fusion decisions</h2><div id="lg-fusion-summary"></div><div id="lg-fusion"></div></section>
<section id="lg-schedule-sec"><h2>schedule (modelled timeline, a lane per stream)</h2><div id="lg-schedule"></div></section>
<section id="lg-overview"><h2>stats (summary.json)</h2><div id="lg-stats"></div>
<h2>events (recompiles, graph breaks)</h2><div id="lg-events"></div></section>
</main>
<script type="application/json" id="lg-data">{{DATA}}</script>
<script>{{JS}}</script>
</body>
</html>
"""

CSS = r"""
body { font: 13px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { display: flex; gap: 16px; align-items: baseline; padding: 8px 16px; background: #263238; color: #eee; }
header h1 { font-size: 17px; margin: 0; }
#lg-path { font-family: monospace; opacity: .75; flex: 1; overflow: hidden; text-overflow: ellipsis; }
main { padding: 0 16px 32px; }
h2 { font-size: 15px; margin: 18px 0 6px; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 4px 12px 12px; margin-top: 12px; }
#lg-errors { display: none; background: #fdd; color: #900; padding: 8px; margin: 8px 16px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.clickable { cursor: pointer; } tr.clickable:hover { background: #eef6ff; } tr.active { background: #dcecff; }
.mono, td.mono { font-family: monospace; }
.bar { display: flex; justify-content: space-between; gap: 8px; flex-wrap: wrap; }
.bar button { margin: 2px; padding: 2px 8px; border: 1px solid #bbb; background: #f6f6f6; border-radius: 4px; cursor: pointer; }
.bar button.on { background: #1e88e5; color: #fff; border-color: #1e88e5; }
#lg-note { color: #666; margin: 4px 0; }
#lg-headline { margin-top: 12px; font-size: 14px; }
.split { display: flex; gap: 10px; align-items: stretch; }
#lg-canvas { flex: 1; min-width: 0; height: 620px; overflow: auto; border: 1px solid #ddd; background: #fff; }
#lg-detail { width: 460px; flex: none; height: 620px; overflow: auto; border: 1px solid #ddd; padding: 6px 10px;
  box-sizing: border-box; background: #fcfcfc; }
#lg-detail h3 { margin: 4px 0; font-size: 14px; word-break: break-all; }
#lg-detail pre, #lg-text { font-size: 11px; background: #f5f5f5; padding: 6px; overflow: auto; white-space: pre; }
#lg-text { max-height: 620px; }
svg text { font: 11px monospace; pointer-events: none; }
svg .box rect { stroke: #777; stroke-width: 1; }
svg .box { cursor: pointer; }
svg .box.input rect { fill: #eceff1; }
svg .box.output rect { stroke: #000; stroke-width: 2.5; }
svg .box.group rect { stroke-dasharray: 4 2; stroke-width: 1.5; }
svg .box.sel rect { stroke: #d50000; stroke-width: 3; }
svg .box:hover rect { stroke: #1e88e5; stroke-width: 2; }
svg path.edge { fill: none; stroke: #9aa; stroke-width: 1; }
svg .cluster rect { fill: #f7f9fc; stroke: #90a4ae; stroke-dasharray: 4 2; }
svg .cluster text { font-weight: bold; }
svg .cluster .head { cursor: pointer; pointer-events: all; fill: transparent; stroke: none; }
.search { position: relative; display: inline-block; }
#lg-search { width: 240px; padding: 2px 6px; margin: 2px; }
#lg-search-results { position: absolute; z-index: 5; right: 0; width: 460px; max-height: 360px; overflow: auto; margin: 0;
  padding: 0; list-style: none; background: #fff; border: 1px solid #bbb; box-shadow: 0 2px 6px rgba(0,0,0,.2); }
#lg-search-results li { padding: 3px 8px; cursor: pointer; font-family: monospace; font-size: 12px; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
#lg-search-results li:hover, #lg-search-results li.first { background: #eef6ff; }
#lg-search-results li .what { color: #888; margin-right: 6px; }
.muted { color: #888; }
.timeline text { font: 11px monospace; fill: #444; }
.timeline rect { stroke: #fff; stroke-width: .5; }
.timeline .step-kernel { fill: #64b5f6; } .timeline .step-extern { fill: #ffb74d; } .timeline .step-view { fill: #bdbdbd; }
.tag { display: inline-block; padding: 0 6px; border-radius: 8px; background: #eee; margin-right: 4px; }
.fuse { color: #1b5e20; } .apart { color: #b71c1c; }
"""

JS = r"""
(function () {
  "use strict";
  function $(id) { return document.getElementById(id); }
  function fail(msg) {
    var box = $("lg-errors");
    box.style.display = "block";
    box.textContent += msg + "\n";
    document.body.setAttribute("data-errors", box.textContent);
  }
  window.addEventListener("error", function (e) { fail("error: " + e.message + " (line " + e.lineno + ")"); });

  var DATA = JSON.parse($("lg-data").textContent);
  var BOX_H = 34;
  var state = { run: 0, pass: 0, kernel: -1, node: null, zoom: 1, text: false, open: {}, layout: null, hits: [],
    section: 0, sections: 1 };

  function esc(s) {
    return String(s === undefined || s === null ? "" : s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }
  function fmtBytes(n) {
    if (typeof n !== "number") return n === undefined || n === null ? "" : String(n);
    var units = ["B", "KiB", "MiB", "GiB"], i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }
  function color(g) { return g < 0 ? "#fff" : "hsl(" + ((g * 137.508) % 360).toFixed(1) + ",70%,80%)"; }
  function run() { return DATA.runs[state.run]; }
  function drawingOf(p) { return DATA.drawings[run().passes[p].drawing]; }

  // ---- sortable tables -------------------------------------------------------------------------
  // columns: {key, label, num, fmt(row) -> html}; onClick(row) makes rows clickable
  function table(container, columns, rows, onClick, activeKey) {
    var sort = { key: null, dir: 1 };
    function draw() {
      var sorted = rows.slice();
      if (sort.key !== null) {
        var col = columns.filter(function (c) { return c.key === sort.key; })[0];
        sorted.sort(function (a, b) {
          var x = a[sort.key], y = b[sort.key];
          if (col.num) { x = Number(x) || 0; y = Number(y) || 0; return (x - y) * sort.dir; }
          return String(x).localeCompare(String(y), undefined, { numeric: true }) * sort.dir;
        });
      }
      var h = ["<table><thead><tr>"];
      columns.forEach(function (c) {
        var cls = c.key === sort.key ? (sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
        h.push('<th data-key="' + esc(c.key) + '" class="' + cls + '">' + esc(c.label) + "</th>");
      });
      h.push("</tr></thead><tbody>");
      sorted.forEach(function (r) {
        var idx = rows.indexOf(r);
        var cls = (onClick ? "clickable" : "") + (activeKey && activeKey(r) ? " active" : "");
        h.push('<tr data-row="' + idx + '" class="' + cls + '">');
        columns.forEach(function (c) {
          var v = c.fmt ? c.fmt(r) : esc(r[c.key]);
          h.push('<td class="' + (c.num ? "num" : "") + (c.mono ? " mono" : "") + '">' + v + "</td>");
        });
        h.push("</tr>");
      });
      h.push("</tbody></table>");
      container.innerHTML = rows.length ? h.join("") : '<span class="muted">none</span>';
    }
    container.onclick = function (e) {
      var th = e.target.closest("th");
      if (th) {
        var key = th.getAttribute("data-key");
        sort.dir = sort.key === key ? -sort.dir : 1;
        sort.key = key;
        draw();
        return;
      }
      var tr = e.target.closest("tr[data-row]");
      if (tr && onClick) onClick(rows[Number(tr.getAttribute("data-row"))]);
    };
    draw();
    return draw;
  }

  // ---- overview --------------------------------------------------------------------------------
  function renderStats(r) {
    var s = r.summary, h = ["<table>"];
    Object.keys(s).forEach(function (k) {
      var v = s[k];
      if (k === "ops" && v && typeof v === "object") {
        v = Object.keys(v).map(function (op) { return '<span class="tag">' + esc(op) + " " + esc(v[op]) + "</span>"; }).join(" ");
      } else if (Array.isArray(v)) {
        v = esc(v.join(" "));
      } else if (/bytes/.test(k) && typeof v === "number") {
        v = esc(fmtBytes(v) + " (" + v + ")");
      } else {
        v = esc(typeof v === "object" ? JSON.stringify(v) : v);
      }
      h.push("<tr><th>" + esc(k) + "</th><td>" + v + "</td></tr>");
    });
    if (!r.compiled) h.push('<tr><th></th><td class="muted">reference run: no passes, kernels or fusion report</td></tr>');
    h.push("</table>");
    $("lg-stats").innerHTML = h.join("");
    var line = [r.name + ":", s.nodes + " nodes"];
    if (s.eager_ops !== undefined || s.kernels !== undefined) {
      line.push("\u00b7 eager ops " + s.eager_ops + " \u2192 " + (s.kernels || 0) + " Triton kernels + " + (s.extern_calls || 0) + " extern calls");
    }
    if (typeof s.eager_bytes === "number" && typeof s.fused_bytes === "number") {
      line.push("\u00b7 memory traffic " + fmtBytes(s.eager_bytes) + " \u2192 " + fmtBytes(s.fused_bytes));
    }
    if (!r.compiled) line.push("\u00b7 reference run");
    if (DATA.events.length) line.push("\u00b7 " + DATA.events.length + " events (recompiles, graph breaks)");
    $("lg-headline").textContent = line.join(" ");
  }

  function renderEvents() {
    var rows = DATA.events.map(function (e) {
      var cause = e.event === "recompile" ? e.guard : e.event === "graph_break" ? (e.op || "") + " at " + (e.source || "?") : "";
      return { event: e.event || "?", cause: cause || "", detail: JSON.stringify(e) };
    });
    table($("lg-events"), [{ key: "event", label: "event" }, { key: "cause", label: "cause", mono: true },
      { key: "detail", label: "record", mono: true }], rows);
  }

  // ---- graph -----------------------------------------------------------------------------------
  // Python sends every node box plus one box per fusion group; a node's `fold` is the group box that
  // stands for it while that group is collapsed. Groups start collapsed; state.open[drawing key] holds
  // the expanded ones. Each change lays the visible boxes out again with dagre (layoutGraph).
  function renderPasses(r) {
    $("lg-passes").innerHTML = r.passes.map(function (p, i) {
      return '<button data-pass="' + i + '">' + esc(p.name) + "</button>";
    }).join("");
  }

  function openGroups() {
    var key = run().passes[state.pass].drawing;
    if (!state.open[key]) state.open[key] = {};
    return state.open[key];
  }

  // box index -> the index of the box drawn for it (itself, or its collapsed group's box), -1 if hidden
  function visibleBoxes(d) {
    var open = openGroups(), groupBox = {}, shown = [];
    d.boxes.forEach(function (b, i) { if (b.kind === "group") groupBox[b.group] = i; });
    d.boxes.forEach(function (b, i) {
      if (b.kind === "group") shown.push(open[b.group] ? -1 : i);
      else shown.push(b.fold >= 0 && !open[b.fold] ? groupBox[b.fold] : i);
    });
    return shown;
  }

  // A big graph is drawn a section at a time: dagre's time grows steeply with boxes and long edges
  // (GPT-2 small's 1254 collapsed boxes take a minute). A section is SECTION visible boxes in graph
  // order: a node's own position, a group at its first member, an input just before its first user.
  var SECTION = 400;
  function sections(d, shown) {
    var key = {};
    shown.forEach(function (v, i) { if (v >= 0 && (key[v] === undefined || i < key[v])) key[v] = i; });
    d.edges.forEach(function (e) {
      var a = shown[e[0]], b = shown[e[1]];
      if (a >= 0 && b >= 0 && d.boxes[a].kind === "input") key[a] = Math.min(key[a], key[b] - 0.5);
    });
    var order = Object.keys(key).map(Number).sort(function (x, y) { return key[x] - key[y]; }), parts = [];
    for (var i = 0; i < order.length; i += SECTION) parts.push(order.slice(i, i + SECTION));
    return parts.length ? parts : [[]];
  }

  // show the section holding the first box that `wanted` picks (a search hit, a selected kernel)
  function reveal(wanted) {
    var d = drawingOf(state.pass), shown = visibleBoxes(d), parts = sections(d, shown);
    for (var p = 0; p < parts.length; p++) {
      if (parts[p].some(function (i) { return wanted(d.boxes[i]); })) {
        if (p !== state.section) { state.section = p; drawGraph(); }
        return;
      }
    }
  }

  // the adapter: visible boxes and edges in, positions out ({x, y} top-left, edge points, clusters)
  function layoutGraph(d) {
    var shown = visibleBoxes(d), open = openGroups(), parts = sections(d, shown), here = {};
    state.section = Math.max(0, Math.min(state.section, parts.length - 1));
    state.sections = parts.length;
    parts[state.section].forEach(function (i) { here[i] = true; });
    shown = shown.map(function (v) { return here[v] ? v : -1; });
    var g = new dagre.graphlib.Graph({ compound: true, multigraph: false });
    g.setGraph({ rankdir: "TB", nodesep: 14, ranksep: 34, edgesep: 8, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(function () { return {}; });
    d.boxes.forEach(function (b, i) {
      if (shown[i] !== i) return;
      g.setNode("b" + i, { width: b.w, height: BOX_H });
      if (b.fold >= 0 && open[b.fold]) {  // a node of an expanded group: inside the group's cluster
        if (!g.hasNode("c" + b.fold)) g.setNode("c" + b.fold, { paddingTop: 22 });
        g.setParent("b" + i, "c" + b.fold);
      }
    });
    d.edges.forEach(function (e) {
      var a = shown[e[0]], b = shown[e[1]];
      if (a >= 0 && b >= 0 && a !== b) g.setEdge("b" + a, "b" + b);
    });
    dagre.layout(g);
    var out = { pos: {}, edges: [], clusters: [], width: g.graph().width || 0, height: g.graph().height || 0 };
    g.nodes().forEach(function (id) {
      var n = g.node(id);
      if (id[0] === "b") out.pos[Number(id.slice(1))] = { x: n.x - n.width / 2, y: n.y - n.height / 2 };
      else out.clusters.push({ group: Number(id.slice(1)), x: n.x - n.width / 2, y: n.y - n.height / 2, w: n.width, h: n.height });
    });
    g.edges().forEach(function (e) { out.edges.push(g.edge(e).points); });
    return out;
  }

  function kernelName(k) { var ks = run().kernels; return ks[k] ? ks[k].name : "group " + k; }

  function drawGraph() {
    var d = drawingOf(state.pass);
    var buttons = $("lg-passes").querySelectorAll("button");
    for (var i = 0; i < buttons.length; i++) buttons[i].classList.toggle("on", i === state.pass);
    var open = Object.keys(openGroups()).length;
    $("lg-note").textContent = run().passes[state.pass].name + ": " + d.nodes + " nodes" +
      (d.groups ? ", " + d.groups + " fused kernels (" + (open ? open + " expanded" : "click one to expand it") + ")" : "") +
      (d.note ? " \u2014 " + d.note : "");
    $("lg-text").textContent = d.text || "";
    var L = layoutGraph(d), parts = [];
    state.layout = L;
    $("lg-sections").hidden = state.sections < 2;
    $("lg-section").textContent = "section " + (state.section + 1) + " of " + state.sections +
      " (" + SECTION + " boxes each, in graph order; edges to other sections are not drawn)";
    L.clusters.forEach(function (c) {
      parts.push('<g class="cluster" data-group="' + c.group + '" transform="translate(' + c.x + "," + c.y + ')">' +
        '<rect width="' + c.w + '" height="' + c.h + '" rx="6"/><text x="8" y="15">\u25be ' + esc(kernelName(c.group)) + "</text>" +
        '<rect class="head" width="' + c.w + '" height="20"><title>click to collapse</title></rect></g>');
    });
    L.edges.forEach(function (pts) {
      var path = "M" + pts[0].x + " " + pts[0].y;
      for (var j = 1; j < pts.length; j++) path += "L" + pts[j].x + " " + pts[j].y;
      parts.push('<path class="edge" d="' + path + '"/>');
    });
    d.boxes.forEach(function (b, i) {
      var p = L.pos[i];
      if (!p) return;
      var label = b.kind === "group" ? "\u25b8 " + b.l1 : b.l1;
      parts.push('<g class="box ' + b.kind + '" data-box="' + i + '" data-id="' + esc(b.id) + '" transform="translate(' + p.x + "," + p.y + ')">' +
        '<rect width="' + b.w + '" height="' + BOX_H + '" rx="4"' + (b.kind === "input" && b.group < 0 ? "" : ' fill="' + color(b.group) + '"') + "/>" +
        '<text x="7" y="14">' + esc(label) + '</text><text x="7" y="28" fill="#555">' + esc(b.l2) + "</text>" +
        "<title>" + esc(b.kind === "group" ? "click to expand\n" + b.text : b.text) + "</title></g>");
    });
    var canvas = $("lg-canvas");
    canvas.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ' + Math.max(L.width, 1) + " " + Math.max(L.height, 1) + '">' + parts.join("") + "</svg>";
    // fit the width, but not below 60%: labels stay readable and a big graph scrolls instead
    state.zoom = L.width ? Math.max(0.6, Math.min(1, (canvas.clientWidth - 4) / L.width)) : 1;
    applyZoom();
    highlight();
    // start where the graph starts: its topmost box (a wide drawing can leave the top-left corner empty)
    var top = null;
    Object.keys(L.pos).forEach(function (i) { if (!top || L.pos[i].y < top.y) top = L.pos[i]; });
    canvas.scrollTop = 0;
    canvas.scrollLeft = top ? Math.max(0, top.x * state.zoom - canvas.clientWidth / 3) : 0;
  }

  function applyZoom() {
    var L = state.layout, svg = $("lg-canvas").querySelector("svg");
    if (!svg || !L) return;
    svg.setAttribute("width", Math.max(1, Math.round(L.width * state.zoom)));
    svg.setAttribute("height", Math.max(1, Math.round(L.height * state.zoom)));
  }

  function highlight() {
    var d = drawingOf(state.pass), gs = $("lg-canvas").querySelectorAll("g.box");
    for (var i = 0; i < gs.length; i++) {
      var b = d.boxes[Number(gs[i].getAttribute("data-box"))];
      var on = (state.kernel >= 0 && b.group === state.kernel) || (state.node !== null && b.id === state.node);
      gs[i].classList.toggle("sel", on);
    }
  }

  function setGroup(k, expanded) {
    var open = openGroups();
    if (expanded) open[k] = true; else delete open[k];
    drawGraph();
  }
  function setAllGroups(expanded) {
    var open = openGroups();
    drawingOf(state.pass).boxes.forEach(function (b) { if (b.kind === "group") { if (expanded) open[b.group] = true; else delete open[b.group]; } });
    drawGraph();
  }

  // ---- search: node names (%12), ops, kernel names, source lines (model.py:40) -------------------
  function searchHits(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    var hits = [], d = drawingOf(state.pass);
    run().kernels.forEach(function (k, i) {
      var where = k.name.toLowerCase().indexOf(q) >= 0 ? "" : k.sources.filter(function (s) { return s.toLowerCase().indexOf(q) >= 0; })[0];
      if (where !== undefined) hits.push({ kind: "kernel", ref: i, label: k.name, what: where ? "kernel at " + where : "kernel", exact: k.name.toLowerCase() === q });
    });
    d.boxes.forEach(function (b) {
      if (b.kind === "group") return;
      var id = b.id.toLowerCase(), hay = (b.l1 + " " + (b.src || "")).toLowerCase();
      if (id === q || hay.indexOf(q) >= 0) hits.push({ kind: "node", ref: b.id, label: b.l1, what: b.src || "node", exact: id === q });
    });
    hits.sort(function (a, b) { return (b.exact ? 1 : 0) - (a.exact ? 1 : 0); });  // stable: kernels, then graph order
    return hits.slice(0, 50);
  }

  function showSearch() {
    var q = $("lg-search").value, list = $("lg-search-results");
    state.hits = searchHits(q);
    list.hidden = !q.trim();
    list.innerHTML = state.hits.length ? state.hits.map(function (h, i) {
      return '<li data-hit="' + i + '"' + (i ? "" : ' class="first"') + '><span class="what">' + esc(h.what) + "</span>" + esc(h.label) + "</li>";
    }).join("") : '<li class="muted">no node, kernel or source line matches</li>';
  }

  function pickHit(h) {
    $("lg-search-results").hidden = true;
    if (!h) return;
    if (h.kind === "kernel") { selectKernel(h.ref); return; }
    var d = drawingOf(state.pass), b = d.boxes.filter(function (x) { return x.id === h.ref; })[0];
    if (b && b.fold >= 0 && !openGroups()[b.fold]) setGroup(b.fold, true);  // show the node itself
    selectNode(h.ref);
    scrollToSelection();
  }
  // ---- details -----------------------------------------------------------------------------------
  function kernelHtml(k) {
    var h = ["<h3>" + esc(k.name) + "</h3>"];
    h.push("<div>" + (k.kind ? '<span class="tag">' + esc(k.kind) + "</span>" : "") + esc(k.nodes.length) + " IR nodes" +
      (typeof k.bytes_read === "number" ? "; read " + esc(fmtBytes(k.bytes_read)) + ", write " + esc(fmtBytes(k.bytes_written)) : "") + "</div>");
    if (k.sources.length) h.push("<div><b>source lines:</b> <span class=\"mono\">" + esc(k.sources.join(", ")) + "</span></div>");
    h.push("<b>IR nodes</b><pre>" + esc(k.lines.join("\n")) + "</pre>");
    h.push("<b>Triton source</b>" + (k.code ? "<pre class=\"kernel-code\">" + esc(k.code) + "</pre>" :
      '<div class="muted">no kernels/' + esc(k.name) + ".py in this dump</div>"));
    if (k.loops) h.push("<b>loop program</b><pre>" + esc(k.loops) + "</pre>");
    return h.join("");
  }

  function showDetail() {
    var r = run(), det = $("lg-detail");
    if (state.kernel >= 0 && r.kernels[state.kernel]) { det.innerHTML = kernelHtml(r.kernels[state.kernel]); return; }
    var d = drawingOf(state.pass);
    var b = d.boxes.filter(function (x) { return x.id === state.node; })[0];
    if (b) {
      det.innerHTML = "<h3>" + esc(b.l1) + "</h3><pre>" + esc(b.text) + "</pre>" +
        (b.src ? '<div><b>source line:</b> <span class="mono">' + esc(b.src) + "</span></div>" : "") +
        (b.group >= 0 ? '<div>part of kernel <a href="#" data-kernel="' + b.group + '">' + esc(kernelName(b.group)) + "</a></div>" :
          '<div class="muted">not part of a fused kernel in this pass</div>');
      return;
    }
    det.innerHTML = '<div class="muted">Click a box to see its node, or its kernel\'s Triton source, IR nodes and source lines. ' +
      (r.kernels.length ? r.kernels.length + " kernels in this run (table below)." : "This run has no kernels.") + "</div>";
  }

  function selectKernel(k) {
    state.kernel = k; state.node = null;
    reveal(function (b) { return b.group === k; });
    highlight(); showDetail(); drawKernels(); scrollToSelection();
  }

  // bring the first highlighted box into the middle of the canvas (big graphs scroll)
  function scrollToSelection() {
    var d = drawingOf(state.pass), canvas = $("lg-canvas"), g = canvas.querySelector("g.box.sel");
    if (!g) return;
    var i = Number(g.getAttribute("data-box")), p = state.layout.pos[i];
    canvas.scrollLeft = Math.max(0, (p.x + d.boxes[i].w / 2) * state.zoom - canvas.clientWidth / 2);
    canvas.scrollTop = Math.max(0, p.y * state.zoom - canvas.clientHeight / 3);
  }
  function selectNode(id) {
    state.kernel = -1; state.node = id;
    reveal(function (b) { return b.id === id; });
    highlight(); showDetail(); drawKernels();
  }

  var drawKernels = function () {};
  function renderKernels(r) {
    var rows = r.kernels.map(function (k) {
      var total = (Number(k.bytes_read) || 0) + (Number(k.bytes_written) || 0);
      return { index: k.index, name: k.name, kind: k.kind, nodes: k.nodes.length, sources: k.sources.join(", "),
        read: k.bytes_read, written: k.bytes_written, total: total };
    });
    drawKernels = table($("lg-kernels"), [
      { key: "index", label: "#", num: true }, { key: "name", label: "kernel", mono: true }, { key: "kind", label: "kind" },
      { key: "nodes", label: "IR nodes", num: true }, { key: "sources", label: "source lines", mono: true },
      { key: "read", label: "read", num: true, fmt: function (x) { return esc(fmtBytes(x.read)); } },
      { key: "written", label: "written", num: true, fmt: function (x) { return esc(fmtBytes(x.written)); } },
      { key: "total", label: "total", num: true, fmt: function (x) { return esc(fmtBytes(x.total)); } }],
      rows, function (row) { selectKernel(row.index); $("lg-graph-sec").scrollIntoView(); },
      function (row) { return row.index === state.kernel; });
  }

  function renderFusion(r) {
    var ds = r.decisions, fused = ds.filter(function (d) { return d.decision === "fuse"; }).length;
    $("lg-fusion-summary").innerHTML = ds.length ? esc(ds.length + " decisions: " + fused + " fused, " + (ds.length - fused) + " kept apart (click a header to sort)") : "";
    table($("lg-fusion"), [
      { key: "producer", label: "producer", mono: true, fmt: function (d) { return esc(d.producer + " " + d.producer_op); } },
      { key: "consumer", label: "consumer", mono: true, fmt: function (d) { return esc(d.consumer + " " + d.consumer_op); } },
      { key: "kind", label: "kind" }, { key: "legal", label: "legal" }, { key: "reason", label: "reason" },
      { key: "bytes_saved", label: "bytes saved", num: true, fmt: function (d) { return esc(fmtBytes(d.bytes_saved)); } },
      { key: "decision", label: "decision", fmt: function (d) { return '<span class="' + (d.decision === "fuse" ? "fuse" : "apart") + '">' + esc(d.decision) + "</span>"; } }],
      ds.map(function (d) { var c = {}; for (var k in d) c[k] = d[k]; c.legal = String(d.legal); return c; }));
  }

  // ---- schedule: the modelled timeline, a row per lane (CUDA stream, CPU worker thread) ----------
  function renderSchedule(r) {
    var s = r.schedule, box = $("lg-schedule");
    if (!s || !s.steps) { box.innerHTML = '<span class="muted">no schedule in this run</span>'; return; }
    var lanes = 1, end = 0;
    s.steps.forEach(function (st) { lanes = Math.max(lanes, st.lane + 1); end = Math.max(end, st.end_us); });
    var W = 960, row = 22, left = 56, scale = end > 0 ? (W - left - 8) / end : 0, h = [];
    h.push("<p>" + esc(s.objective + ": " + lanes + " of " + s.lanes_available + " lanes (" + s.profile + " profile), " +
      s.moved + " steps moved; modelled critical path " + s.critical_path_us + " us, this order " + s.modelled_us +
      " us, one lane " + s.serial_us + " us; peak memory " + fmtBytes(s.peak_bytes) + " (recording order " +
      fmtBytes(s.recorded_peak_bytes) + ")") + "</p>");
    h.push('<svg class="timeline" width="' + W + '" height="' + (lanes * row + 20) + '">');
    for (var l = 0; l < lanes; l++) h.push('<text x="4" y="' + (l * row + 15) + '">lane ' + l + "</text>");
    s.steps.forEach(function (st, i) {
      var x = left + st.start_us * scale, w = Math.max((st.end_us - st.start_us) * scale, 1);
      h.push('<rect class="step-' + esc(st.kind) + '" x="' + x.toFixed(1) + '" y="' + (st.lane * row + 3) + '" width="' +
        w.toFixed(1) + '" height="' + (row - 6) + '"><title>' + esc("#" + i + " " + st.name + " (" + st.kind +
        ", recorded #" + st.recorded + "): " + st.start_us + ".." + st.end_us + " us") + "</title></rect>");
    });
    h.push('<text x="' + left + '" y="' + (lanes * row + 15) + '">0 us</text><text x="' + (W - 8) + '" y="' +
      (lanes * row + 15) + '" text-anchor="end">' + esc(end) + " us</text></svg>");
    h.push('<div class="muted">blue: kernel, orange: extern call, grey: view; hover a step for its times</div>');
    h.push("<ul>" + (s.reasons || []).map(function (x) { return "<li><code>" + esc(x) + "</code></li>"; }).join("") + "</ul>");
    box.innerHTML = h.join("");
  }

  // ---- selection -------------------------------------------------------------------------------
  function selectPass(p) {
    state.pass = Math.max(0, Math.min(p, run().passes.length - 1));
    state.section = 0;
    drawGraph(); showDetail();
  }

  function selectRun(i, passName) {
    state.run = i; state.kernel = -1; state.node = null;
    var r = run();
    $("lg-run").value = String(i);
    renderStats(r); renderPasses(r); renderKernels(r); renderFusion(r); renderSchedule(r);
    var p = r.default_pass;
    r.passes.forEach(function (x, j) { if (x.name === passName) p = j; });
    selectPass(p);
  }

  function init() {
    $("lg-path").textContent = DATA.path;
    var sel = $("lg-run");
    DATA.runs.forEach(function (r, i) {
      var o = document.createElement("option");
      o.value = String(i);
      o.textContent = r.name + " \u2014 " + (r.summary.nodes !== undefined ? r.summary.nodes + " nodes, " : "") +
        (r.compiled ? r.kernels.length + " kernels" : "reference");
      sel.appendChild(o);
    });
    sel.onchange = function () { selectRun(Number(sel.value)); };
    $("lg-passes").onclick = function (e) {
      var b = e.target.closest("button");
      if (b) selectPass(Number(b.getAttribute("data-pass")));
    };
    $("lg-canvas").onclick = function (e) {
      var head = e.target.closest("g.cluster");
      if (head && e.target.classList.contains("head")) { setGroup(Number(head.getAttribute("data-group")), false); return; }
      var g = e.target.closest("g.box");
      if (!g) return;
      var b = drawingOf(state.pass).boxes[Number(g.getAttribute("data-box"))];
      if (b.kind === "group") setGroup(b.group, true);  // expand, and show the kernel beside it
      if (b.group >= 0) selectKernel(b.group); else selectNode(b.id);
    };
    $("lg-detail").onclick = function (e) {
      var a = e.target.closest("a[data-kernel]");
      if (a) { e.preventDefault(); selectKernel(Number(a.getAttribute("data-kernel"))); }
    };
    $("lg-prev").onclick = function () { state.section--; drawGraph(); };
    $("lg-next").onclick = function () { state.section++; drawGraph(); };
    $("lg-expand-all").onclick = function () { setAllGroups(true); };
    $("lg-collapse-all").onclick = function () { setAllGroups(false); };
    var search = $("lg-search");
    search.oninput = showSearch;
    search.onkeydown = function (e) {
      if (e.key === "Enter") pickHit(state.hits[0]);
      if (e.key === "Escape") $("lg-search-results").hidden = true;
    };
    $("lg-search-results").onclick = function (e) {
      var li = e.target.closest("li[data-hit]");
      if (li) pickHit(state.hits[Number(li.getAttribute("data-hit"))]);
    };
    $("lg-zoom-in").onclick = function () { state.zoom *= 1.25; applyZoom(); };
    $("lg-zoom-out").onclick = function () { state.zoom /= 1.25; applyZoom(); };
    $("lg-zoom-fit").onclick = function () {
      var L = state.layout, c = $("lg-canvas");
      state.zoom = L && L.width ? Math.min((c.clientWidth - 4) / L.width, (c.clientHeight - 4) / L.height) : 1;
      applyZoom();
    };
    $("lg-text-toggle").onclick = function () {
      state.text = !state.text;
      $("lg-text").hidden = !state.text;
      this.classList.toggle("on", state.text);
    };
    renderEvents();
    if (!DATA.runs.length) { $("lg-detail").textContent = "no runs in this dump"; return; }
    // #run=run-0001&pass=03-fuse&kernel=NAME&node=%5 selects on load
    var args = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("=");
      if (i > 0) args[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    var ri = DATA.runs.length - 1;
    DATA.runs.forEach(function (r, i) { if (r.name === args.run) ri = i; });
    selectRun(ri, args.pass);
    if (args.expand) drawingOf(state.pass).boxes.forEach(function (b) {
      if (b.kind === "group" && (args.expand === "all" || kernelName(b.group) === args.expand)) openGroups()[b.group] = true;
    });
    if (args.expand) drawGraph();
    if (args.kernel) run().kernels.forEach(function (k, i) { if (k.name === args.kernel) selectKernel(i); });
    if (args.node) selectNode(args.node);
    if (args.search) { $("lg-search").value = args.search; showSearch(); }
  }

  try { init(); } catch (e) { fail("error: " + (e && e.stack ? e.stack : e)); }
  document.body.setAttribute("data-ready", "1");
})();
"""
