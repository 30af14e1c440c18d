// Opens one graph page of circuit-tracer's local viewer in headless Chromium (playwright-core,
// the system browser) and prints what it drew as JSON: the node marks of the link graph, the
// logit labels, the page's errors, and any request that left 127.0.0.1. The viewer's page loads
// d3 (+ d3-jetpack), dagre and pako from two CDNs; those requests are answered from the npm
// packages of the same libraries (.ci/circuit-tracer-venv installs them), nothing else leaves
// the machine.
//   node view.cjs URL SCREENSHOT.png NODE_MODULES CHROMIUM PROFILE_DIR
const [url, shot, modules, browserPath, profile] = process.argv.slice(2)
const { chromium } = require(`${modules}/playwright-core`)

const fs = require('fs')
// d3-jetpack's UMD build takes d3 from require() or resets window.d3: load it (and the d3-collection
// it needs for nestBy) as CommonJS modules over the page's d3 v7, and add what it exports to d3.
const cjs = (name, file) => `__m[${JSON.stringify(name)}] = (function(){var module = {exports: {}}, exports = ` +
  `module.exports, require = n => __m[n] || window.d3;\n${fs.readFileSync(`${modules}/${file}`, 'utf8')}\n` +
  'return module.exports})();\n'
const JETPACK = `(function(){var __m = {};\n${cjs('d3-collection', 'd3-collection/dist/d3-collection.js')}` +
  `${cjs('jetpack', 'd3-jetpack/build/d3-jetpack.cjs')}Object.assign(window.d3, __m.jetpack)})();\n` +
  // npm's jetpack (2.3) dropped conventions' drawAxis, which the viewer calls: an x axis at the
  // bottom and a y axis at the left of the given layer, as jetpack 2.0 drew them
  `(function(){var conventions = d3.conventions; d3.conventions = function(opts){var c = conventions(opts);
    c.drawAxis = c.drawAxis || function(svg){ svg = svg || c.svg;
      return {xAxisSel: svg.append('g').attr('class', 'x axis').attr('transform', 'translate(0,' + c.height + ')')
        .call(c.xAxis), yAxisSel: svg.append('g').attr('class', 'y axis').call(c.yAxis)} }
    return c }})()`
const CDN = {
  'transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js': { path: `${modules}/d3/dist/d3.js` },
  'transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js': { body: JETPACK },
  'unpkg.com/dagre@0.8.5/dist/dagre.min.js': { path: `${modules}/dagre/dist/dagre.min.js` },
  'unpkg.com/pako@2.1.0/dist/pako.min.js': { path: `${modules}/pako/dist/pako.min.js` },
}
const STUBS = ['npy_v0.js', 'hotserver-client-ws.js']  // not used by the graph page

;(async () => {
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: browserPath, headless: true, viewport: { width: 1400, height: 1000 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  })
  const out = { errors: [], blocked: [], nodes: 0, logitLabels: [], tokens: [] }
  await context.route('**/*', route => {
    const u = new URL(route.request().url())
    if (u.hostname === '127.0.0.1') return route.continue()
    const key = u.host + u.pathname
    if (CDN[key]) return route.fulfill({ ...CDN[key], contentType: 'text/javascript' })
    if (STUBS.some(s => u.pathname.endsWith(s))) return route.fulfill({ body: '', contentType: 'text/javascript' })
    out.blocked.push(u.href)
    return route.abort()
  })
  const page = context.pages()[0] || await context.newPage()
  page.on('pageerror', e => out.errors.push(String(e)))
  page.on('console', m => { if (m.type() === 'error') out.errors.push(m.text()) })
  await page.goto(url, { waitUntil: 'load' })
  try {
    await page.waitForSelector('text.node', { timeout: 30000 })
  } catch (e) { out.errors.push('no node was drawn: ' + e) }
  await page.waitForTimeout(1500)
  Object.assign(out, await page.evaluate(() => ({
    nodes: document.querySelectorAll('.link-graph text.node').length,
    allNodeMarks: document.querySelectorAll('text.node').length,
    logitLabels: [...document.querySelectorAll('.link-graph g.axis text')].map(t => t.textContent),
    tokens: [...document.querySelectorAll('.link-graph g.prompt-token text')].map(t => t.textContent),
  })))
  await page.screenshot({ path: shot })
  await context.close()
  console.log(JSON.stringify(out))
})().catch(e => { console.log(JSON.stringify({ fatal: String(e) })); process.exit(1) })
