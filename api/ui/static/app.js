// The SHARP dashboard's one script: every page calls the JSON API (/v1/...) with the API key
// kept in sessionStorage as its bearer token. No framework, no build step.
// Everything shown is set through textContent (never innerHTML), so data cannot inject markup.
(function () {
  'use strict';

  const KEY = 'sharp.apiKey';
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const COLORS = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];

  // -- helpers ---------------------------------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === 'class') node.className = v;
      else if (k.startsWith('data-')) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

  function fmt(v) {
    if (typeof v !== 'number') return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4);
  }

  // A parameter count in millions (billions from 1e9): 0.40M, 1.32B (as `sharp jobs show`).
  function fmtParams(n) {
    return n >= 1e9 ? `${(n / 1e9).toFixed(2)}B` : `${(n / 1e6).toFixed(2)}M`;
  }

  function fmtHeads(perLayer) {
    return Object.entries(perLayer || {}).map(([layer, heads]) => `${layer}: [${heads.join(', ')}]`).join(' · ');
  }

  // The event log's line for a 'pruned' event (ops.follow.pruned_summary says the same).
  function prunedSummary(p) {
    const counts = [...new Set(Object.values(p.heads_per_layer || {}).map((h) => h.length))].sort((a, b) => a - b);
    const n = !counts.length ? 'no' : counts.length === 1 ? String(counts[0]) : `${counts[0]}-${counts[counts.length - 1]}`;
    const heads = `${n} head${n === '1' ? '' : 's'} per layer`;
    return `pruned: layers [${(p.kept_layers || []).join(', ')}], ${heads}, `
      + `${fmtParams(p.params_before)} → ${fmtParams(p.params_after)} params`;
  }

  function fmtTime(iso) { return iso ? new Date(iso).toLocaleString() : '–'; }

  function fmtEta(s) {
    if (s === null || s === undefined) return '–';
    s = Math.round(s);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
  }

  function showPageError(message) {
    const p = $('page-error');
    if (!p) return;
    p.textContent = message;
    p.hidden = !message;
  }

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(e.message || `HTTP ${status}`);
      this.status = status;
      this.code = e.code || `http_${status}`;
      this.param = e.param || null;
      // every error of an invalid spec, the first included (absent for a lone error)
      this.errors = Array.isArray(e.errors) && e.errors.length ? e.errors : null;
    }
  }

  function apiKey() { return sessionStorage.getItem(KEY); }

  function toLogin() {
    sessionStorage.removeItem(KEY);
    const next = location.pathname + location.search;
    location.assign('/ui/login?next=' + encodeURIComponent(next));
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: 'Bearer ' + apiKey() }, extra || {});
  }

  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || 'GET', headers: authHeaders(), cache: 'no-store' };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers['Content-Type'] = 'application/json';
    }
    const r = await fetch(path, init);
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (r.status === 401 && !opts.noRedirect) { toLogin(); throw new ApiError(401, body); }
    if (!r.ok) throw new ApiError(r.status, body);
    return body;
  }

  // A download needs the Authorization header, which a plain link cannot send: fetch the file,
  // then hand the browser a blob URL to save.
  async function download(url, filename) {
    const r = await fetch(url, { headers: authHeaders(), cache: 'no-store' });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      throw new ApiError(r.status, body);
    }
    const blob = await r.blob();
    const a = el('a', { href: URL.createObjectURL(blob), download: filename });
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 60000);
  }

  // -- Server-Sent Events over fetch ----------------------------------------------------------
  // EventSource cannot send an Authorization header, so the stream is read with fetch. A lost
  // connection resumes with Last-Event-ID (the server replays exactly what came after it).

  async function followEvents(jobId, onEvent, onState) {
    let lastId = null;
    let failures = 0;
    let done = false;
    while (!done) {
      const headers = authHeaders({ Accept: 'text/event-stream' });
      if (lastId !== null) headers['Last-Event-ID'] = lastId;
      try {
        onState(failures ? `reconnecting (try ${failures})` : 'connecting');
        const r = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { headers, cache: 'no-store' });
        if (r.status === 401) { toLogin(); return; }
        if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
        onState('live');
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done: end } = await reader.read();
          if (end) break;
          // sse-starlette separates lines with CRLF; a chunk may end between CR and LF.
          buf = (buf + value).replace(/\r\n/g, '\n').replace(/\r(?!$)/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let event = 'message';
            const data = [];
            let id = null;
            for (const line of block.split('\n')) {
              if (!line || line.startsWith(':')) continue;
              const i = line.indexOf(':');
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
              if (field === 'event') event = val;
              else if (field === 'data') data.push(val);
              else if (field === 'id') id = val;
            }
            if (id !== null) lastId = id;
            if (data.length) {
              const payload = JSON.parse(data.join('\n'));
              onEvent(event, payload);
              if (event === 'status' && TERMINAL.has(payload.status)) done = true;
            }
            failures = 0;
          }
        }
      } catch (e) {
        if (e instanceof ApiError && e.status === 404) { onState('job not found'); return; }
      }
      if (!done) {
        failures += 1;
        onState(`reconnecting in ${Math.min(5, 0.5 * failures)} s`);
        await sleep(Math.min(5000, 500 * failures));
      }
    }
    onState('ended');
  }

  // -- a line chart on <canvas> ---------------------------------------------------------------

  class Chart {
    constructor(canvas, opts) {
      this.canvas = canvas;
      this.series = new Map();
      this.logY = !!(opts && opts.logY);
      this.pending = false;
      this.empty = 'no data yet';
    }

    add(name, x, y) {
      if (typeof y !== 'number' || !Number.isFinite(y)) return;
      if (!this.series.has(name)) this.series.set(name, []);
      const pts = this.series.get(name);
      if (pts.length && pts[pts.length - 1][0] === x) pts[pts.length - 1][1] = y;
      else pts.push([x, y]);
      this.schedule();
    }

    count() {
      let n = 0;
      for (const pts of this.series.values()) n += pts.length;
      return n;
    }

    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }

    draw() {
      const c = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const w = c.clientWidth || 400;
      const h = c.clientHeight || 240;
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
      const g = c.getContext('2d');
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      c.dataset.points = String(this.count());
      c.dataset.series = [...this.series.keys()].join(',');
      g.font = '11px system-ui, sans-serif';
      g.fillStyle = '#6b7280';
      if (!this.series.size) {
        g.fillText(this.empty, 12, h / 2);
        return;
      }
      const ty = (y) => (this.logY ? Math.log10(Math.max(y, 1e-12)) : y);
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const pts of this.series.values()) {
        for (const [x, y] of pts) {
          x0 = Math.min(x0, x); x1 = Math.max(x1, x);
          y0 = Math.min(y0, ty(y)); y1 = Math.max(y1, ty(y));
        }
      }
      if (x1 === x0) { x0 -= 1; x1 += 1; }
      if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
      const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
      const L = 52, R = 10, B = 22;
      // The legend (name and last value of each series), wrapped over as many rows as needed.
      const legend = [];
      let lx = L, row = 0;
      [...this.series.entries()].forEach(([name, pts], i) => {
        const text = `${name} ${fmt(pts[pts.length - 1][1])}`;
        const width = g.measureText(text).width;
        if (lx + width > w - R && lx > L) { row += 1; lx = L; }
        legend.push({ text, x: lx, y: 14 + row * 14, color: COLORS[i % COLORS.length] });
        lx += width + 14;
      });
      const T = 24 + row * 14;
      const sx = (x) => L + ((x - x0) / (x1 - x0)) * (w - L - R);
      const sy = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (h - T - B);
      const label = (v) => fmt(this.logY ? Math.pow(10, v) : v);
      g.strokeStyle = '#e5e7eb';
      g.lineWidth = 1;
      for (let i = 0; i <= 4; i++) {
        const v = y0 + ((y1 - y0) * i) / 4;
        const py = T + (1 - i / 4) * (h - T - B);
        g.beginPath(); g.moveTo(L, py); g.lineTo(w - R, py); g.stroke();
        g.fillText(label(v), 4, py + 4);
      }
      g.fillText(`step ${fmt(x0)}`, L, h - 6);
      const right = `${fmt(x1)}`;
      g.fillText(right, w - R - g.measureText(right).width, h - 6);
      [...this.series.values()].forEach((pts, i) => {
        const color = COLORS[i % COLORS.length];
        g.strokeStyle = color;
        g.lineWidth = 1.5;
        g.beginPath();
        pts.forEach(([x, y], j) => (j ? g.lineTo(sx(x), sy(y)) : g.moveTo(sx(x), sy(y))));
        g.stroke();
        if (pts.length === 1) {
          g.fillStyle = color;
          g.fillRect(sx(pts[0][0]) - 2, sy(pts[0][1]) - 2, 4, 4);
        }
      });
      for (const item of legend) {
        g.fillStyle = item.color;
        g.fillText(item.text, item.x, item.y);
      }
    }
  }

  // -- pages ----------------------------------------------------------------------------------

  function loginPage() {
    const form = $('login-form');
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const key = $('api-key').value.trim();
      const out = $('login-error');
      out.hidden = true;
      try {
        const r = await fetch('/v1/jobs?limit=1', { headers: { Authorization: 'Bearer ' + key } });
        if (!r.ok) {
          const body = await r.json().catch(() => null);
          throw new ApiError(r.status, body);
        }
        sessionStorage.setItem(KEY, key);
        const next = new URLSearchParams(location.search).get('next');
        // Only a path on this site: never an absolute URL that would carry the user away.
        location.assign(next && next.startsWith('/ui/') ? next : '/ui/jobs');
      } catch (e) {
        out.textContent = e.message;
        out.hidden = false;
      }
    });
  }

  function jobRow(job) {
    const p = job.progress || {};
    return el('tr', { 'data-job-id': job.id },
      el('td', {}, el('a', { href: '/ui/jobs/' + encodeURIComponent(job.id) }, job.id)),
      el('td', {}, job.name),
      el('td', {}, el('span', { class: `badge status-${job.status}` }, job.status)),
      el('td', {}, `${p.step || 0} / ${p.max_steps || '?'}`),
      el('td', {}, job.queue),
      el('td', {}, fmtTime(job.created_at)));
  }

  async function jobsPage() {
    const params = new URLSearchParams(location.search);
    const statuses = params.getAll('status').flatMap((s) => s.split(',')).filter(Boolean);
    for (const box of document.querySelectorAll('#status-filter input[name=status]')) {
      box.checked = statuses.includes(box.value);
    }
    const limit = Math.min(100, Math.max(1, parseInt(params.get('limit') || '20', 10) || 20));
    const query = new URLSearchParams({ limit: String(limit) });
    if (statuses.length) query.set('status', statuses.join(','));
    if (params.get('after')) query.set('after', params.get('after'));
    $('page-limit').value = String(limit);
    const first = new URLSearchParams();
    if (statuses.length) first.set('status', statuses.join(','));
    first.set('limit', String(limit));
    $('first-page').href = '/ui/jobs?' + first.toString();
    $('first-page').hidden = !params.get('after');
    const load = async () => {
      const page = await api('/v1/jobs?' + query.toString());
      const body = $('jobs-body');
      body.replaceChildren(...page.data.map(jobRow));
      if (!page.data.length) body.append(el('tr', {}, el('td', { colSpan: 6, class: 'muted' }, 'No jobs.')));
      const next = $('next-page');
      if (page.next_cursor) {
        const np = new URLSearchParams();
        if (statuses.length) np.set('status', statuses.join(','));
        if (params.get('limit')) np.set('limit', String(limit));
        np.set('after', page.next_cursor);
        next.href = '/ui/jobs?' + np.toString();
        next.hidden = false;
      } else {
        next.hidden = true;
      }
      return page.data.some((j) => !TERMINAL.has(j.status));
    };
    // Refresh while something on the page can still change.
    for (;;) {
      let active = false;
      try { active = await load(); showPageError(''); } catch (e) { showPageError(e.message); active = true; }
      if (!active) return;
      await sleep(5000);
    }
  }

  function metricGroup(name, classification) {
    if (name.startsWith('sharp_')) return 'sharp';
    if (name.startsWith('cos_')) return 'cos';
    if (classification ? (name === 'eval_accuracy' || name === 'eval_macro_f1') : name === 'eval_ppl') return 'eval';
    if (name.startsWith('eval_')) return null;
    if (name === 'loss' || name.endsWith('_loss')) return 'loss';
    return null;
  }

  async function jobPage() {
    const jobId = document.body.dataset.jobId;
    let job;
    try {
      job = await api('/v1/jobs/' + encodeURIComponent(jobId));
    } catch (e) {
      showPageError(e.status === 404 ? `No job ${jobId} for this team.` : e.message);
      return;
    }
    const classification = (job.spec || {}).task === 'sequence_classification';
    $('chart-eval-title').textContent = classification
      ? 'Evaluation: accuracy and macro-F1' : 'Evaluation perplexity';
    const charts = {
      loss: new Chart($('chart-loss')),
      eval: new Chart($('chart-eval'), { logY: !classification }),
      sharp: new Chart($('chart-sharp')),
      cos: new Chart($('chart-cos')),
    };
    Object.values(charts).forEach((c) => c.draw());
    $('job-spec').textContent = JSON.stringify(job.spec, null, 2);
    const latest = Object.assign({}, job.metrics || {});
    let step = job.progress.step || 0;

    function renderJob() {
      $('job-name').textContent = job.name;
      const badge = $('job-status');
      badge.textContent = job.status;
      badge.className = `badge status-${job.status}`;
      badge.dataset.status = job.status;
      const max = job.progress.max_steps || 1;
      $('job-progress').max = max;
      $('job-progress').value = Math.min(step, max);
      $('job-step').textContent = `${step} / ${max}`;
      $('job-summary').textContent = `queue ${job.queue} · attempt ${job.attempt}/${job.max_attempts} · created ${fmtTime(job.created_at)}`
        + (job.finished_at ? ` · finished ${fmtTime(job.finished_at)}` : '');
      const facts = [];
      if (job.queue_position !== undefined && job.queue_position !== null) facts.push(['queue position', job.queue_position]);
      if (job.queue_reason) facts.push(['waiting because', job.queue_reason]);
      if (job.progress.tokens_per_s) facts.push(['tokens/s', Math.round(job.progress.tokens_per_s)]);
      if (job.status === 'running') facts.push(['ETA', fmtEta(job.progress.eta_s)]);
      const shown = classification
        ? ['loss', 'eval_accuracy', 'eval_macro_f1', 'lr']
        : ['loss', 'eval_ppl', 'lr'];
      for (const name of shown) if (name in latest) facts.push([name.replace(/^eval_/, 'eval '), fmt(latest[name])]);
      for (const name of Object.keys(latest).sort()) if (name.startsWith('sharp_')) facts.push([name, fmt(latest[name])]);
      $('job-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', {}, k), el('dd', { 'data-fact': k }, v)]));
      const err = $('job-error');
      err.hidden = !job.error;
      if (job.error) err.textContent = `${job.error.code}: ${job.error.message}` + (job.error.param ? ` (${job.error.param})` : '');
      $('cancel-job').hidden = TERMINAL.has(job.status) || job.status === 'cancelling';
      $('retry-job').hidden = !(job.status === 'failed' || job.status === 'cancelled');
    }

    // "Pruned from the teacher": the job's `pruning` (GET /v1/jobs/{id}), or the live 'pruned'
    // event with the step-0 evaluation from the metrics stream.
    let pruning = null;
    const step0 = {};

    function takePruning(p) {
      if (!p) return;
      pruning = p;
      for (const [k, v] of Object.entries(p.eval_at_step_0 || {})) if (typeof v === 'number') step0[k] = v;
    }
    takePruning(job.pruning);

    function renderPruning() {
      if (!pruning) return;
      const facts = [
        ['kept layers', `[${pruning.kept_layers.join(', ')}]`],
        ['heads per layer', fmtHeads(pruning.heads_per_layer)],
      ];
      if (pruning.kv_heads_per_layer) facts.push(['kv heads per layer', fmtHeads(pruning.kv_heads_per_layer)]);
      if (pruning.ffn !== null && pruning.ffn !== undefined) facts.push(['ffn', pruning.ffn]);
      if (pruning.hidden !== null && pruning.hidden !== undefined) facts.push(['hidden', pruning.hidden]);
      const before = pruning.params_before, after = pruning.params_after;
      facts.push(['parameters', `${fmtParams(before)} → ${fmtParams(after)}`
        + (before ? ` (${(100 * after / before).toFixed(1)}% of the teacher)` : '')]);
      facts.push(['calibration', `${pruning.calibration_samples} samples in ${Number(pruning.calibration_s).toFixed(2)} s (${pruning.scoring})`]);
      const evals = [];
      if (typeof step0.eval_ppl === 'number') evals.push(['step-0 perplexity', fmt(step0.eval_ppl)]);
      if (typeof step0.eval_accuracy === 'number') evals.push(['step-0 accuracy', fmt(step0.eval_accuracy)]);
      if (typeof step0.eval_macro_f1 === 'number') evals.push(['step-0 macro-F1', fmt(step0.eval_macro_f1)]);
      facts.push(...(evals.length ? evals : [['step-0 evaluation', 'not yet']]));
      $('pruned-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', {}, k), el('dd', { 'data-pruned': k }, v)]));
      const note = $('pruned-note');
      note.hidden = !pruning.note;
      note.textContent = pruning.note || '';
      $('pruned-panel').hidden = false;
    }

    // "Evaluation": the job's `evaluation` (GET /v1/jobs/{id}): each harness score beside the
    // teacher's with retained %, answer quality, sample answers, and the failure if any.
    function renderEvaluation() {
      const ev = job.evaluation;
      $('evaluation-panel').hidden = !ev;
      if (!ev) return;
      const teacher = ev.teacher_scores || {};
      $('eval-teacher').textContent = ev.teacher_digest
        ? `teacher ${ev.teacher_digest.slice(0, 12)}` + (ev.teacher_scores_reused === null || ev.teacher_scores_reused === undefined ? ''
          : ev.teacher_scores_reused ? ' · its scores reused from an earlier job' : ' · its scores computed by this job')
        : '';
      const err = $('eval-error');
      err.hidden = !ev.error;
      err.textContent = ev.error ? `evaluation failed: ${ev.error.code}: ${ev.error.message}` : '';
      const names = Object.keys(ev.scores || {}).filter((k) => !k.endsWith('_stderr')).sort();
      $('eval-scores').hidden = !names.length;
      const num = (v) => typeof v === 'number';
      $('eval-scores-body').replaceChildren(...names.map((k) => {
        const v = ev.scores[k], se = ev.scores[k + '_stderr'], t = teacher[k];
        const r = (ev.retained || {})['retained/' + k.slice('harness/'.length)];
        return el('tr', { 'data-metric': k },
          el('td', {}, k.slice('harness/'.length)),
          el('td', { 'data-col': 'student', 'data-value': String(v) }, fmt(v) + (num(se) ? ` ± ${fmt(se)}` : '')),
          el('td', { 'data-col': 'teacher', 'data-value': num(t) ? String(t) : '' }, num(t) ? fmt(t) : '–'),
          el('td', { 'data-col': 'retained', 'data-value': num(r) ? String(r) : '' }, num(r) ? `${(100 * r).toFixed(1)} %` : '–'));
      }));
      const quality = Object.entries(ev.answer_quality || {}).sort();
      $('eval-quality-title').hidden = !quality.length;
      $('eval-quality').replaceChildren(...quality.flatMap(([k, v]) => [el('dt', {}, k.replace(/^gen\//, '')), el('dd', { 'data-quality': k, 'data-value': String(v) }, fmt(v))]));
      const samples = ev.answer_samples || [];
      $('eval-samples').hidden = !samples.length;
      $('eval-samples-body').replaceChildren(...samples.map((s) => el('tr', {},
        el('td', { class: 'sample' }, s.prompt), el('td', { class: 'sample' }, s.reference),
        el('td', { class: 'sample' }, s.answer), el('td', {}, num(s.rougeL) ? fmt(s.rougeL) : '–'))));
    }

    async function refreshJob() {
      try {
        job = await api('/v1/jobs/' + encodeURIComponent(jobId));
        renderJob();
        takePruning(job.pruning);
        renderPruning();
        renderEvaluation();
      } catch (e) { showPageError(e.message); }
    }

    async function loadCheckpoints() {
      const res = await api(`/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`);
      const body = $('checkpoints-body');
      if (!res.data.length) return;
      body.replaceChildren(...res.data.map((ck) => {
        const base = `/v1/jobs/${encodeURIComponent(jobId)}/checkpoints/${ck.step}`;
        const links = el('div', {});
        const archive = el('a', { href: '#', class: 'download archive', 'data-url': `${base}/archive`, 'data-filename': `${jobId}-step_${ck.step}.tar` }, 'whole checkpoint (.tar)');
        links.append(archive);
        for (const f of ck.files) {
          links.append(' · ', el('a', {
            href: '#', class: 'download file', title: `${f.size} bytes, sha256 ${f.sha256}`,
            'data-url': `${base}/files/${f.name.split('/').map(encodeURIComponent).join('/')}`,
            'data-filename': f.name.split('/').pop(),
          }, f.name));
        }
        const m = Object.entries(ck.metrics || {}).filter(([k, v]) => typeof v === 'number' && (k.startsWith('eval_') || k === 'loss'));
        return el('tr', { 'data-step': ck.step },
          el('td', {}, ck.step),
          el('td', {}, m.map(([k, v]) => `${k} ${fmt(v)}`).join(', ')),
          el('td', {}, links));
      }));
    }

    document.addEventListener('click', async (ev) => {
      const a = ev.target.closest && ev.target.closest('a.download');
      if (!a) return;
      ev.preventDefault();
      try { await download(a.dataset.url, a.dataset.filename); } catch (e) { showPageError(`download failed: ${e.message}`); }
    });
    $('cancel-job').addEventListener('click', async () => {
      try { job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: 'POST' }); renderJob(); } catch (e) { showPageError(e.message); }
    });
    $('retry-job').addEventListener('click', async () => {
      try { await api(`/v1/jobs/${encodeURIComponent(jobId)}/retry`, { method: 'POST' }); location.reload(); } catch (e) { showPageError(e.message); }
    });

    const log = $('event-log');
    function logEvent(kind, data) {
      const when = data.created_at ? new Date(data.created_at).toLocaleTimeString() : '';
      if (kind === 'metrics') {
        const steps = (data.metrics || []).map((p) => p.step);
        if (!steps.length) return;
        const last = log.lastElementChild;
        if (last && last.dataset.kind === 'metrics') {
          last.dataset.to = Math.max(+last.dataset.to, ...steps);
          last.textContent = `${last.dataset.when}  metrics, steps ${last.dataset.from}–${last.dataset.to}`;
          last.value = data.seq;
          return;
        }
        const li = el('li', { 'data-kind': 'metrics', 'data-from': Math.min(...steps), 'data-to': Math.max(...steps), 'data-when': when });
        li.value = data.seq;
        li.textContent = `${when}  metrics, steps ${li.dataset.from}–${li.dataset.to}`;
        log.append(li);
        return;
      }
      let text = kind;
      if (kind === 'status') {
        text = `status ${data.status}` + (data.attempt ? ` (attempt ${data.attempt})` : '')
          + (data.worker ? ` on ${data.worker}` : '')
          + (data.error ? ` — ${data.error.code}: ${data.error.message}` : '');
      } else if (kind === 'checkpoint') {
        text = `checkpoint at step ${data.step}`;
      } else if (kind === 'pruned') {
        text = prunedSummary(data);
      }
      const li = el('li', { 'data-kind': kind }, `${when}  ${text}`);
      li.value = data.seq;
      log.append(li);
    }

    renderJob();
    renderPruning();
    renderEvaluation();
    loadCheckpoints().catch((e) => showPageError(e.message));
    await followEvents(jobId, (kind, data) => {
      logEvent(kind, data);
      if (kind === 'metrics') {
        for (const point of data.metrics || []) {
          step = Math.max(step, point.step);
          if (point.step === 0) {
            for (const name of ['eval_ppl', 'eval_accuracy', 'eval_macro_f1']) {
              if (name in (point.values || {})) step0[name] = point.values[name];
            }
            renderPruning();
          }
          for (const [name, value] of Object.entries(point.values || {})) {
            latest[name] = value;
            const group = metricGroup(name, classification);
            if (group) charts[group].add(name, point.step, value);
          }
        }
        renderJob();
      } else if (kind === 'status') {
        job.status = data.status;
        if (data.attempt) job.attempt = data.attempt;
        renderJob();
        refreshJob();
        if (TERMINAL.has(data.status)) loadCheckpoints().catch((e) => showPageError(e.message));
      } else if (kind === 'checkpoint') {
        loadCheckpoints().catch((e) => showPageError(e.message));
      } else if (kind === 'pruned') {
        const { seq, created_at, ...report } = data;  // the event's envelope is not the report
        pruning = Object.assign({}, pruning || {}, report);
        renderPruning();
      }
    }, (s) => { $('stream-state').textContent = s; });
    await refreshJob();
    await loadCheckpoints().catch((e) => showPageError(e.message));
    const method = ((job.spec || {}).method || {}).name || '?';
    for (const c of Object.values(charts)) {
      if (!c.count()) { c.empty = `none recorded (method ${method})`; c.draw(); }
    }
  }

  // -- sweeps ---------------------------------------------------------------------------------
  // A sweep has no event stream: its pages poll the sweeps API (GET /v1/sweeps/{id}, /report,
  // /curves) every SWEEP_POLL_MS while it runs, and stop after one last load once it has ended.

  const SWEEP_POLL_MS = 2000;
  const SWEEP_ACTIVE = new Set(['running', 'queued', 'cancelling']);

  // The API's counts: stage → job status → cells ("tune: succeeded 4, queued 2 · final: …").
  function fmtCounts(counts) {
    return Object.entries(counts || {}).map(([stage, by]) => {
      const text = Object.entries(by || {}).filter(([, n]) => n).sort().map(([k, n]) => `${k} ${n}`).join(', ');
      return text ? `${stage}: ${text}` : '';
    }).filter(Boolean).join(' · ') || '–';
  }

  function sweepStage(s) { return s.final_started_at ? 'final' : 'tune'; }

  function fmtOverrides(o) {
    return Object.entries(o || {}).filter(([k]) => k !== 'method.name').sort()
      .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ');
  }

  function sweepRow(s) {
    return el('tr', { 'data-sweep-id': s.id },
      el('td', {}, el('a', { href: '/ui/sweeps/' + encodeURIComponent(s.id) }, s.id)),
      el('td', {}, s.name),
      el('td', {}, el('span', { class: `badge status-${s.status}` }, s.status)),
      el('td', {}, sweepStage(s)),
      el('td', {}, fmtCounts(s.counts)),
      el('td', {}, fmtTime(s.created_at)));
  }

  async function sweepsPage() {
    const params = new URLSearchParams(location.search);
    const limit = Math.min(100, Math.max(1, parseInt(params.get('limit') || '20', 10) || 20));
    const query = new URLSearchParams({ limit: String(limit) });
    if (params.get('after')) query.set('after', params.get('after'));
    $('first-page').hidden = !params.get('after');
    const load = async () => {
      const page = await api('/v1/sweeps?' + query.toString());
      const body = $('sweeps-body');
      body.replaceChildren(...page.data.map(sweepRow));
      if (!page.data.length) body.append(el('tr', {}, el('td', { colSpan: 6, class: 'muted' }, 'No sweeps.')));
      const next = $('next-page');
      next.hidden = !page.next_cursor;
      if (page.next_cursor) next.href = '/ui/sweeps?' + new URLSearchParams({ limit: String(limit), after: page.next_cursor });
      return page.data.some((s) => SWEEP_ACTIVE.has(s.status));
    };
    for (;;) {
      let active = false;
      try { active = await load(); showPageError(''); } catch (e) { showPageError(e.message); active = true; }
      if (!active) return;
      await sleep(5000);
    }
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  // A short line in a method's colour and a cell's line style (the legend, the cells table).
  function swatch(color, style) {
    const attrs = { x1: 1, y1: 5, x2: 23, y2: 5, stroke: color, 'stroke-width': style === 'thin' ? 1 : 2.5 };
    if (style === 'dashed') attrs['stroke-dasharray'] = '5 3';
    if (style === 'thin') attrs['stroke-opacity'] = 0.45;
    return svg('svg', { width: 24, height: 10, 'aria-hidden': 'true' }, svg('line', attrs));
  }

  // How a cell's curve is drawn: the final stage dashed, the chosen configuration thick, the
  // other tuning trials thin and faint.
  function lineStyle(cell, best) {
    if (cell.stage === 'final') return 'dashed';
    return best && best[cell.method] === cell.config ? 'chosen' : 'thin';
  }

  // Every cell's eval curve in one inline SVG: x = step, y = the metric (log scale for a
  // perplexity). One <polyline> per cell that has points, with its job, method and seed.
  function drawCurves(root, cells, colorOf, best, metric) {
    const W = 900, H = 360, L = 60, R = 12, T = 12, B = 28;
    const logY = /ppl$/.test(metric || '');
    const ty = (y) => (logY ? Math.log10(Math.max(y, 1e-12)) : y);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const c of cells) {
      for (const [x, y] of c.points) {
        if (typeof y !== 'number' || !Number.isFinite(y)) continue;
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, ty(y)); y1 = Math.max(y1, ty(y));
      }
    }
    const kids = [];
    if (x0 === Infinity) {
      kids.push(svg('text', { x: W / 2 - 60, y: H / 2 }, 'no evaluations yet'));
      root.replaceChildren(...kids);
      root.dataset.lines = '0';
      return;
    }
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      const py = T + (1 - i / 4) * (H - T - B);
      kids.push(svg('line', { class: 'grid', x1: L, x2: W - R, y1: py, y2: py }));
      kids.push(svg('text', { x: 4, y: py + 4 }, fmt(logY ? Math.pow(10, v) : v)));
    }
    kids.push(svg('text', { x: L, y: H - 8 }, `step ${fmt(x0)}`));
    kids.push(svg('text', { x: W - R - 40, y: H - 8 }, fmt(x1)));
    // thin lines first, so the chosen and final ones are drawn over them
    const order = { thin: 0, chosen: 1, dashed: 2 };
    const drawn = cells.filter((c) => c.points.some(([, y]) => typeof y === 'number' && Number.isFinite(y)))
      .sort((a, b) => order[lineStyle(a, best)] - order[lineStyle(b, best)]);
    for (const c of drawn) {
      const style = lineStyle(c, best);
      const pts = c.points.filter(([, y]) => typeof y === 'number' && Number.isFinite(y));
      const color = colorOf(c.method);
      const last = pts[pts.length - 1];
      const attrs = {
        class: `cell-line ${style}`, fill: 'none', stroke: color,
        'stroke-width': style === 'thin' ? 1 : 2.5, 'stroke-opacity': style === 'thin' ? 0.45 : 1,
        points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' '),
        'data-job-id': c.job_id, 'data-method': c.method, 'data-config': c.config,
        'data-seed': c.seed, 'data-stage': c.stage, 'data-style': style, 'data-color': color,
        'data-points': pts.length, 'data-status': c.status,
      };
      if (style === 'dashed') attrs['stroke-dasharray'] = '6 4';
      kids.push(svg('polyline', attrs,
        svg('title', {}, `${c.method} ${c.config} seed ${c.seed} (${c.stage}, ${c.status}): ${fmt(last[1])} at step ${last[0]}`)));
      if (pts.length === 1) kids.push(svg('circle', { cx: sx(last[0]), cy: sy(last[1]), r: 2.5, fill: color }));
    }
    root.replaceChildren(...kids);
    root.dataset.lines = String(drawn.length);
  }

  // One report table (a stage of GET /v1/sweeps/{id}/report): per method its chosen config,
  // mean ± std (n), Δ vs the reference with its interval, p and Holm p, failed / cells.
  function renderReport(table, rep, colorOf) {
    const body = table.tBodies[0];
    const rows = Object.entries(rep.methods || {}).map(([name, m]) => {
      const d = m.delta;
      const unit = rep.metric.relative ? ' %' : '';
      const sign = (v) => (v > 0 ? '+' : '') + fmt(v);
      const delta = d ? `${sign(d.mean)}${unit}` + (d.ci ? ` [${sign(d.ci[0])}, ${sign(d.ci[1])}]` : '') + ` (n ${d.n})` : '';
      const cfg = fmtOverrides(m.overrides);
      const num = (k, v) => el('td', { 'data-col': k, 'data-value': v === null || v === undefined ? '' : String(v) },
        v === null || v === undefined ? '–' : fmt(v));
      return el('tr', { 'data-method': name, class: name === rep.reference ? 'reference' : null },
        el('td', { 'data-col': 'method' }, swatch(colorOf(name), 'chosen'), name),
        el('td', { 'data-col': 'config', 'data-value': m.config || '', title: cfg }, m.config || '–', cfg ? el('div', { class: 'muted' }, cfg) : null),
        el('td', { 'data-col': 'mean', 'data-value': m.mean === null ? '' : String(m.mean), 'data-std': m.std === null ? '' : String(m.std), 'data-n': String(m.n) },
          m.mean === null ? '–' : `${fmt(m.mean)}` + (m.std === null ? '' : ` ± ${fmt(m.std)}`), ` (${m.n})`),
        el('td', { 'data-col': 'delta', 'data-value': d ? String(d.mean) : '' }, delta),
        num('p', d ? d.p : null),
        num('p_holm', d ? d.p_holm : null),
        el('td', { 'data-col': 'failed', 'data-failed': String(m.failed), 'data-cells': String(m.cells) }, `${m.failed} / ${m.cells}`),
        el('td', { 'data-col': 'configs' }, m.configs_tried));
    });
    body.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colSpan: 8, class: 'muted' }, 'No results yet.'))]));
    const level = Object.values(rep.methods || {}).map((m) => m.delta && m.delta.level).find(Boolean) || 0.95;
    table.tHead.querySelector('th:nth-child(4)').textContent = `Δ vs ${rep.reference || 'reference'}${rep.metric.relative ? ' (%)' : ''} [${Math.round(level * 100)}% CI]`;
  }

  async function sweepPage() {
    const sweepId = document.body.dataset.sweepId;
    const base = '/v1/sweeps/' + encodeURIComponent(sweepId);
    const colors = new Map();
    const colorOf = (m) => {
      if (!colors.has(m)) colors.set(m, COLORS[colors.size % COLORS.length]);
      return colors.get(m);
    };
    let sweep = null;

    function renderSweep() {
      $('sweep-name').textContent = sweep.name;
      const badge = $('sweep-status');
      badge.textContent = sweep.status;
      badge.className = `badge status-${sweep.status}`;
      badge.dataset.status = sweep.status;
      $('sweep-summary').textContent = `stage ${sweepStage(sweep)} · ${sweep.cells.length} cells: ${fmtCounts(sweep.counts)}`
        + ` · reference ${sweep.reference || '–'} · created ${fmtTime(sweep.created_at)}`
        + (sweep.finished_at ? ` · finished ${fmtTime(sweep.finished_at)}` : '');
      $('cancel-sweep').hidden = !SWEEP_ACTIVE.has(sweep.status);
    }

    function renderCells(best) {
      $('cells-body').replaceChildren(...sweep.cells.map((c) => el('tr', { 'data-job-id': c.job_id || '', 'data-index': c.index, 'data-status': c.status },
        el('td', {}, c.index),
        el('td', {}, c.stage),
        el('td', {}, swatch(colorOf(c.method), lineStyle(c, best)), c.method),
        el('td', { title: fmtOverrides(c.overrides) }, c.config),
        el('td', {}, c.seed),
        el('td', {}, el('span', { class: `badge status-${c.status}` }, c.status)),
        el('td', {}, c.progress ? `${c.progress.step} / ${c.progress.max_steps}` : ''),
        el('td', { 'data-value': c.value === null || c.value === undefined ? '' : String(c.value) }, c.value === null || c.value === undefined ? '' : fmt(c.value)),
        el('td', {}, c.job_id ? el('a', { href: '/ui/jobs/' + encodeURIComponent(c.job_id) }, c.job_id) : ''))));
    }

    // The leaderboard's columns per cell (the report's `cells`), shown once any cell has a
    // downstream score.
    function renderCellScores(cells) {
      const names = new Set();
      for (const c of cells) for (const k of Object.keys(c.scores || {})) names.add(k);
      const cols = [...names].filter((k) => !k.endsWith('_stderr') && k !== 'gen/answers' && k !== 'gen/exact_match_n').sort();
      $('scores-block').hidden = !cols.length;
      if (!cols.length) return;
      const label = (k) => k.startsWith('retained/') ? `${k.slice(9)} retained` : k.replace(/^(harness|gen)\//, '');
      $('cell-scores-head').replaceChildren(...['Job', 'Stage', 'Method', 'Config', 'Seed', 'Perplexity', ...cols.map(label)]
        .map((h, i) => el('th', { 'data-col': i < 6 ? h.toLowerCase() : cols[i - 6] }, h)));
      $('cell-scores-body').replaceChildren(...cells.map((c) => el('tr', { 'data-job-id': c.job_id },
        el('td', {}, el('a', { href: '/ui/jobs/' + encodeURIComponent(c.job_id) }, c.job_id)),
        el('td', {}, c.stage), el('td', {}, c.method), el('td', {}, c.config), el('td', {}, c.seed),
        el('td', { 'data-col': 'ppl', 'data-value': c.ppl === null ? '' : String(c.ppl) }, c.ppl === null ? '–' : fmt(c.ppl)),
        ...cols.map((k) => {
          const v = (c.scores || {})[k];
          const has = v !== undefined && v !== null;
          const shown = !has ? '–' : k.startsWith('retained/') ? `${(100 * v).toFixed(1)} %` : fmt(v);
          return el('td', { 'data-col': k, 'data-value': has ? String(v) : '' }, shown);
        }))));
    }

    // The report's gap closed (final stage when it has one, else tune): one row per method,
    // one column per score the teacher has; absent when the sweep has no baseline to close from.
    function renderGaps(report) {
      const part = report && report.final && report.final.gap_closed ? report.final : report && report.tune;
      const g = part ? part.gap_closed : null;
      $('gaps-block').hidden = !g;
      if (!g) return;
      $('gaps-stage').textContent = `(${part === report.final ? 'final' : 'tune'} · baseline ${g.baseline}, ${g.baseline_config})`;
      const names = new Set();
      for (const m of Object.values(g.methods)) for (const k of Object.keys(m.gap_closed)) names.add(k);
      const cols = [...names].sort();
      $('gaps-head').replaceChildren(...['Method', 'Config', ...cols.map((k) => k.replace(/^(harness|gen)\//, ''))]
        .map((h, i) => el('th', { 'data-col': i < 2 ? h.toLowerCase() : cols[i - 2] }, h)));
      $('gaps-body').replaceChildren(...Object.entries(g.methods).map(([m, e]) => el('tr', { 'data-method': m },
        el('td', {}, m), el('td', {}, e.config),
        ...cols.map((k) => {
          const v = e.gap_closed[k];
          const has = v !== undefined && v !== null;
          return el('td', { 'data-col': k, 'data-value': has ? String(v) : '' }, has ? `${(100 * v).toFixed(1)} %` : '–');
        }))));
    }

    function renderLegend() {
      $('curves-legend').replaceChildren(...[...colors.entries()].map(([m, color]) =>
        el('li', { 'data-method': m, 'data-color': color }, swatch(color, 'chosen'), m)));
    }

    async function load() {
      sweep = await api(base);
      // colours in the order the methods first appear among the cells (stable while polling)
      for (const c of sweep.cells) colorOf(c.method);
      renderSweep();
      let report = null;
      try {
        report = await api(base + '/report');
        $('report-error').hidden = true;
      } catch (e) {
        if (e.status === 401) throw e;
        $('report-error').textContent = `No report yet: ${e.message}`;
        $('report-error').hidden = false;
      }
      const best = report && report.tune ? report.tune.best : null;
      renderCellScores(report ? report.cells || [] : []);
      renderGaps(report);
      const notes = report ? [report.selection_metric_note, report.final ? report.final_metric_note : null].filter(Boolean) : [];
      $('report-notes').replaceChildren(...notes.map((n) => el('li', {}, n)));
      $('report-notes').hidden = !notes.length;
      const failed = report ? report.failed_cells || [] : [];
      $('failed-cells').replaceChildren(...failed.map((f) => el('li', { 'data-job-id': f.job_id },
        el('span', { class: `badge status-${f.status}` }, f.status), ` cell ${f.index} (${f.stage}, ${f.config}, seed ${f.seed}) `,
        el('a', { href: '/ui/jobs/' + encodeURIComponent(f.job_id) }, f.job_id),
        f.error ? `: ${f.error.code}: ${f.error.message}` : '')));
      $('failed-block').hidden = !failed.length;
      if (report && report.tune) {
        $('report-metric').textContent = `(${report.tune.metric.name}, ${report.tune.metric.lower_is_better ? 'lower' : 'higher'} is better)`;
        renderReport($('report-tune'), report.tune, colorOf);
      }
      $('report-final-block').hidden = !(report && report.final);
      if (report && report.final) {
        $('report-final-metric').textContent = report.final.metric.name;
        renderReport($('report-final'), report.final, colorOf);
      }
      renderCells(best);
      const curves = await api(base + '/curves');
      $('curves-metric').textContent = `(${curves.metric})`;
      drawCurves($('curves'), curves.cells, colorOf, best, curves.metric);
      renderLegend();
      $('sweep-updated').textContent = new Date().toLocaleTimeString();
      return SWEEP_ACTIVE.has(sweep.status);
    }

    $('cancel-sweep').addEventListener('click', async () => {
      try { sweep = await api(base + '/cancel', { method: 'POST' }); renderSweep(); } catch (e) { showPageError(e.message); }
    });

    for (;;) {
      let active;
      try {
        active = await load();
        showPageError('');
      } catch (e) {
        if (e.status === 404) { showPageError(`No sweep ${sweepId} for this team.`); $('poll-state').textContent = 'stopped'; return; }
        showPageError(e.message);
        active = true;
      }
      $('poll-state').textContent = active ? 'live' : 'ended';
      document.body.dataset.poll = active ? 'live' : 'ended';
      if (!active) return;
      await sleep(SWEEP_POLL_MS);
    }
  }

  // The submit form: text → /ui/api/parse-spec (spec + line of each field) → POST /v1/jobs;
  // the API's `param` (spec.training.lr) is shown beside the line that holds that field.
  function submitPage() {
    const text = $('spec-text');
    const gutter = $('spec-gutter');
    const errors = $('spec-errors');
    const formError = $('form-error');
    let marks = [];

    function lineHeight() { return parseFloat(getComputedStyle(text).lineHeight) || 20; }
    function padTop() { return parseFloat(getComputedStyle(text).paddingTop) || 0; }

    function renderGutter() {
      const n = text.value.split('\n').length;
      const bad = new Set(marks.map((m) => m.line));
      gutter.replaceChildren(...Array.from({ length: n }, (_, i) =>
        el('span', { class: bad.has(i + 1) ? 'bad' : '' }, String(i + 1) + '\n')));
      gutter.scrollTop = text.scrollTop;
    }

    function place() {
      const lh = lineHeight();
      for (const box of errors.children) {
        const line = +box.dataset.line;
        box.style.top = `${padTop() + (line - 1) * lh - text.scrollTop}px`;
      }
      gutter.scrollTop = text.scrollTop;
    }

    function clearErrors() {
      marks = [];
      errors.replaceChildren();
      formError.hidden = true;
      renderGutter();
    }

    function showError(param, message, line) {
      if (!marks.length) {
        // Bring the (first) offending line into view, a few lines below the top.
        const top = padTop() + (line - 1) * lineHeight();
        if (top < text.scrollTop || top > text.scrollTop + text.clientHeight - 2 * lineHeight()) {
          text.scrollTop = Math.max(0, top - 3 * lineHeight());
        }
      }
      marks.push({ line });
      errors.append(el('div', { class: 'field-error', 'data-param': param || 'spec', 'data-line': line, title: message }, message));
      renderGutter();
      place();
      formError.textContent = (param ? `${param}: ` : '') + message;
      formError.hidden = false;
    }

    // The deepest field of `param` that the text contains (a missing field is reported where
    // its parent is).
    function lineOf(param, lines) {
      let p = param || 'spec';
      if (!p.startsWith('spec')) p = 'spec.' + p;
      for (;;) {
        if (lines && p in lines) return lines[p];
        const cut = p.lastIndexOf('.');
        if (cut < 0) return 1;
        p = p.slice(0, cut);
      }
    }

    text.addEventListener('input', () => { renderGutter(); });
    text.addEventListener('scroll', place);
    renderGutter();

    $('submit-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      clearErrors();
      const button = $('submit-button');
      button.disabled = true;
      let parsed = null;
      try {
        parsed = await api('/ui/api/parse-spec', { method: 'POST', body: { text: text.value } });
        const job = await api('/v1/jobs', { method: 'POST', body: { spec: parsed.spec } });
        location.assign('/ui/jobs/' + encodeURIComponent(job.id));
      } catch (e) {
        if (!(e instanceof ApiError)) { showError('spec', e.message, 1); return; }
        const all = e.errors || [{ param: e.param, message: e.message }];
        for (const one of all) {  // each beside its own line
          let line = lineOf(one.param, parsed && parsed.lines);
          const m = !parsed && /line (\d+)/.exec(one.message);
          if (m) line = +m[1];
          showError(one.param, one.message, line);
        }
        formError.textContent = all.map((o) => (o.param ? `${o.param}: ` : '') + o.message).join('\n');
      } finally {
        button.disabled = false;
      }
    });
  }

  // -- teachers and the leaderboard of a teacher's students ------------------------------------

  async function teachersPage() {
    const body = $('teachers-body');
    const res = await api('/v1/teachers');
    const rows = res.data.map((t) => el('tr', { 'data-digest': t.teacher_digest },
      el('td', {}, el('a', { href: '/ui/teachers/' + t.teacher_digest }, el('code', {}, t.teacher_digest.slice(0, 12)))),
      el('td', { 'data-col': 'students' }, t.students)));
    body.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colSpan: 2, class: 'muted' },
      'No distilled job yet (a job records its teacher when it starts).'))]));
  }

  // The leaderboard's columns: fixed ones, then one per harness score (student value, and the
  // retained % beside it) and the answer-quality metrics, as present in any row.
  function leaderboardColumns(board) {
    const names = new Set();
    for (const r of board.students) for (const k of Object.keys(r.scores)) names.add(k);
    for (const t of board.teacher_scores) for (const k of Object.keys(t.scores)) names.add(k);
    const harness = [...names].filter((k) => k.startsWith('harness/') && !k.endsWith('_stderr')).sort();
    const gen = [...names].filter((k) => k.startsWith('gen/') && k !== 'gen/answers' && k !== 'gen/exact_match_n').sort();
    const cols = [
      { key: 'job', label: 'Job', value: (r) => r.job_id, text: true },
      { key: 'name', label: 'Name', value: (r) => r.name, text: true },
      { key: 'status', label: 'Status', value: (r) => r.status, text: true },
      { key: 'method', label: 'Method', value: (r) => r.method, text: true },
      { key: 'init', label: 'Init', value: (r) => r.init, text: true },
      { key: 'params', label: 'Params', value: (r) => r.params, show: (v) => fmtParams(v) },
      { key: 'tokens_seen', label: 'Tokens', value: (r) => r.tokens_seen },
      { key: 'ppl', label: 'Perplexity', value: (r) => r.ppl },
    ];
    for (const h of harness) {
      const short = h.slice('harness/'.length);
      cols.push({ key: h, label: short, value: (r) => r.scores[h] });
      cols.push({ key: 'retained/' + short, label: `${short} retained`, value: (r) => r.scores['retained/' + short],
        show: (v) => `${(100 * v).toFixed(1)} %` });
    }
    for (const g of gen) cols.push({ key: g, label: g.slice('gen/'.length), value: (r) => r.scores[g] });
    return cols;
  }

  async function teacherPage() {
    const digest = document.body.dataset.digest;
    const board = await api(`/v1/teachers/${encodeURIComponent(digest)}/students`);
    const cols = leaderboardColumns(board);
    const teacherScores = Object.assign({}, ...board.teacher_scores.map((t) => t.scores));
    const summary = Object.keys(teacherScores).filter((k) => !k.endsWith('_stderr'))
      .map((k) => `${k.slice('harness/'.length)} ${fmt(teacherScores[k])}`).join(' · ');
    $('teacher-summary').textContent = (board.teacher_params ? `Teacher: ${fmtParams(board.teacher_params)} params. ` : '')
      + (summary ? `Teacher scores: ${summary}.` : 'No teacher scores yet (none of its students ran harness tasks).');
    let sort = { key: 'ppl', dir: 1 };
    const head = $('leaderboard-head');
    const body = $('leaderboard-body');
    function render() {
      const col = cols.find((c) => c.key === sort.key) || cols[0];
      const rows = [...board.students].sort((a, b) => {
        const va = col.value(a); const vb = col.value(b);
        if (va === null || va === undefined) return 1;
        if (vb === null || vb === undefined) return -1;
        return (col.text ? String(va).localeCompare(String(vb)) : va - vb) * sort.dir;
      });
      head.replaceChildren(...cols.map((c) => {
        const th = el('th', { 'data-col': c.key, class: 'sortable', title: 'Sort' }, c.label,
          c.key === sort.key ? (sort.dir > 0 ? ' ▲' : ' ▼') : '');
        th.addEventListener('click', () => {
          sort = { key: c.key, dir: c.key === sort.key ? -sort.dir : 1 };
          render();
        });
        return th;
      }));
      const teacherRow = el('tr', { class: 'teacher-row', 'data-job-id': '' }, ...cols.map((c) => {
        const v = c.key.startsWith('harness/') ? teacherScores[c.key] : c.key === 'params' ? board.teacher_params : undefined;
        const label = c.key === 'job' ? 'teacher' : v === undefined || v === null ? '' : c.show ? c.show(v) : fmt(v);
        return el('td', { 'data-col': c.key, 'data-value': v === undefined || v === null ? '' : String(v) }, label);
      }));
      body.replaceChildren(teacherRow, ...rows.map((r) => el('tr', { 'data-job-id': r.job_id }, ...cols.map((c) => {
        const v = c.value(r);
        const has = v !== null && v !== undefined;
        const shown = c.key === 'job' ? el('a', { href: '/ui/jobs/' + encodeURIComponent(r.job_id) }, r.job_id)
          : !has ? '–' : c.show ? c.show(v) : c.text ? String(v) : fmt(v);
        return el('td', { 'data-col': c.key, 'data-value': has ? String(v) : '' }, shown);
      }))));
      body.dataset.sortedBy = sort.key;
    }
    render();
  }

  // -- start ----------------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    const page = document.body.dataset.page;
    if (page === 'login') { loginPage(); return; }
    if (!apiKey()) { toLogin(); return; }
    const out = $('sign-out');
    if (out) out.addEventListener('click', () => { sessionStorage.removeItem(KEY); location.assign('/ui/login'); });
    const run = { jobs: jobsPage, job: jobPage, submit: submitPage, sweeps: sweepsPage, sweep: sweepPage, teachers: teachersPage, teacher: teacherPage }[page];
    if (run) Promise.resolve(run()).catch((e) => showPageError(e.message));
  });
})();
