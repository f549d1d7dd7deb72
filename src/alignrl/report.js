/* alignrl report renderer: draws each div.chart (data-chart="N") of the page as an SVG line chart from the JSON
   in the element #report-data ({runs: [{label, color}], charts: [{title, series: [{run, label, dash, points:
   [[step, value|null], ...]}]}]}). No libraries, no network; text goes in through textContent only. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var W = 440, H = 250, L = 58, R = 14, T = 10, B = 34; // viewBox size and plot margins
  var DASHES = ["", "7 4", "2 3", "9 3 2 3", "1 6"]; // the same list as report.py's DASHES
  var MARKERS = 40; // series with at most this many points get a dot at each point
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var tooltip = document.getElementById("tooltip");

  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }

  // "nice" tick values (spaced 1, 2 or 5 times a power of ten) inside [lo, hi]; their spacing as .step
  function ticks(lo, hi, n, integer) {
    var raw = (hi - lo) / n, step = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / step;
    step *= f >= 7.5 ? 10 : f >= 3.5 ? 5 : f >= 1.5 ? 2 : 1;
    if (integer) step = Math.max(1, Math.round(step));
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    out.step = step;
    return out;
  }

  // a value in the tooltip: 5 significant digits
  function fmt(v) {
    var a = Math.abs(v);
    if (v === 0) return "0";
    if (a >= 1e6 || a < 1e-3) return v.toExponential(3).replace("e+", "e");
    return String(Number(v.toPrecision(5)));
  }

  // a tick label: as many digits as the tick spacing needs
  function tickLabel(v, step) {
    var a = Math.max(Math.abs(v), step), digits = -Math.floor(Math.log10(step) + 1e-9);
    if (v === 0) return "0";
    if (a >= 1e6 || a < 1e-3) {
      var d = Math.floor(Math.log10(Math.abs(v)) + 1e-9) + digits;
      return v.toExponential(Math.max(0, Math.min(6, d))).replace("e+", "e");
    }
    return v.toFixed(Math.max(0, Math.min(10, digits)));
  }

  function extent(chart) {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    chart.series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p[1] === null) return;
        x0 = Math.min(x0, p[0]); x1 = Math.max(x1, p[0]);
        y0 = Math.min(y0, p[1]); y1 = Math.max(y1, p[1]);
      });
    });
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    var pad = y0 === y1 ? Math.abs(y0) * 0.1 || 1 : (y1 - y0) * 0.05;
    return { x0: x0, x1: x1, y0: y0 - pad, y1: y1 + pad };
  }

  // index of the point of `points` (sorted by step) whose step is nearest to `step`
  function nearest(points, step) {
    var lo = 0, hi = points.length - 1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (points[mid][0] < step) lo = mid; else hi = mid;
    }
    return Math.abs(points[lo][0] - step) <= Math.abs(points[hi][0] - step) ? lo : hi;
  }

  function draw(div, chart) {
    var e = extent(chart);
    var X = function (s) { return L + (s - e.x0) / (e.x1 - e.x0) * (W - L - R); };
    var Y = function (v) { return T + (e.y1 - v) / (e.y1 - e.y0) * (H - T - B); };
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    el("title", {}, svg).textContent = chart.title;
    var axes = el("g", { "class": "axes" }, svg);
    var yt = ticks(e.y0, e.y1, 5, false), xt = ticks(e.x0, e.x1, 6, true);
    yt.forEach(function (v) {
      el("line", { "class": "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }, axes);
      el("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, axes).textContent = tickLabel(v, yt.step);
    });
    xt.forEach(function (s) {
      el("line", { x1: X(s), x2: X(s), y1: H - B, y2: H - B + 4 }, axes);
      el("text", { x: X(s), y: H - B + 16, "text-anchor": "middle" }, axes).textContent = tickLabel(s, 1);
    });
    el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B }, axes);
    el("line", { x1: L, x2: L, y1: T, y2: H - B }, axes);
    el("text", { x: W - R, y: H - 3, "text-anchor": "end" }, axes).textContent = "step";
    chart.series.forEach(function (s) {
      var color = data.runs[s.run].color, d = "", pen = "M", finite = [];
      s.points.forEach(function (p) {
        if (p[1] === null) { pen = "M"; return; } // a gap where the value was null or not finite
        d += pen + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1);
        pen = "L";
        finite.push(p);
      });
      if (finite.length > 1) {
        el("path", { "class": "line", d: d, stroke: color, "stroke-dasharray": DASHES[s.dash % DASHES.length] }, svg);
      }
      if (finite.length <= MARKERS) {
        finite.forEach(function (p) { el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.4, fill: color }, svg); });
      }
    });
    var guide = el("line", { "class": "guide", x1: 0, x2: 0, y1: T, y2: H - B, visibility: "hidden" }, svg);
    var hit = el("rect", { "class": "hit", x: L, y: T, width: W - L - R, height: H - T - B }, svg);
    hit.addEventListener("mousemove", function (ev) { hover(ev, svg, chart, e, guide, X); });
    hit.addEventListener("mouseleave", function () {
      tooltip.hidden = true;
      guide.setAttribute("visibility", "hidden");
    });
    div.querySelector(".plot").appendChild(svg);
  }

  function hover(ev, svg, chart, e, guide, X) {
    var box = svg.getBoundingClientRect();
    var step = e.x0 + ((ev.clientX - box.left) * W / box.width - L) / (W - L - R) * (e.x1 - e.x0);
    var best = null;
    chart.series.forEach(function (s) {
      var p = s.points[nearest(s.points, step)];
      if (best === null || Math.abs(p[0] - step) < Math.abs(best - step)) best = p[0];
    });
    tooltip.textContent = "";
    var head = document.createElement("div");
    head.className = "tip-head";
    head.textContent = chart.title + " — step " + best;
    tooltip.appendChild(head);
    chart.series.forEach(function (s) {
      var p = s.points[nearest(s.points, best)];
      if (p[0] !== best) return;
      var row = document.createElement("div");
      var key = document.createElement("span");
      key.className = "swatch";
      key.style.background = data.runs[s.run].color;
      row.appendChild(key);
      row.appendChild(document.createTextNode(s.label + ": " + (p[1] === null ? "—" : fmt(p[1]))));
      tooltip.appendChild(row);
    });
    guide.setAttribute("x1", X(best));
    guide.setAttribute("x2", X(best));
    guide.setAttribute("visibility", "visible");
    tooltip.hidden = false;
    var left = Math.min(ev.clientX + 14, window.innerWidth - tooltip.offsetWidth - 8);
    tooltip.style.left = Math.max(4, left) + "px";
    tooltip.style.top = ev.clientY + 14 + "px";
  }

  document.querySelectorAll(".chart").forEach(function (div) {
    draw(div, data.charts[Number(div.getAttribute("data-chart"))]);
  });
  document.body.setAttribute("data-rendered", String(data.charts.length));
})();
