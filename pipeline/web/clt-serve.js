// Our helper for circuit-tracer 0.5.0's page under `clt serve` (pipeline/serve/), loaded
// before the page's own scripts. The page keeps its state in the URL and its Save button posts
// what the URL holds, so:
// 1. when a graph arrives with saved supernodes and the URL has none, they go into the URL
//    (the page reads supernodes from the URL only, init-cg.js), so that they show and a later
//    save keeps them;
// 2. choosing another graph in the page's menu clears the previous graph's pinnedIds and
//    supernodes from the URL (the page would otherwise apply them to the new graph);
// 3. a banner says when the graph's saved annotations name nodes it no longer has (the server
//    lists them in the graph's `annotations.stale`);
// 4. a fetch for another origin (the page's fallbacks: Hugging Face, its CDN) fails at once
//    instead of leaving this machine.
;(function () {
  'use strict'
  var pageFetch = window.fetch

  function setParam(key, value) {
    var url = new URL(window.location)
    if (value === null) url.searchParams.delete(key)
    else url.searchParams.set(key, value)
    history.replaceState(null, '', url)
  }

  function showStale(annotations) {
    var old = document.querySelector('.clt-stale')
    if (old) old.remove()
    var stale = (annotations && annotations.stale) || []
    if (!stale.length) return
    var banner = document.createElement('div')
    banner.className = 'clt-stale'
    banner.textContent = annotations.file + ' names ' + stale.length + ' node(s) this graph no longer has (' +
      stale.map(function (e) { return e.field + ' ' + e.id }).join(', ') +
      '): they stay in the file and are not shown.'
    banner.style.cssText = 'position:fixed;left:0;right:0;bottom:0;z-index:10000;padding:6px 12px;' +
      'background:#fff3cd;border-top:1px solid #e0c068;font:12px sans-serif'
    document.body.appendChild(banner)
  }

  window.fetch = async function (input) {
    var url = typeof input == 'string' ? input : input.url
    if (new URL(url, window.location.href).origin != window.location.origin) {
      throw new TypeError('clt serve: ' + url + ' is not on this server, and the page loads nothing from elsewhere')
    }
    var res = await pageFetch.apply(this, arguments)
    if (!res.ok || !/(^|\/)graph_data\/[^/?]+\.json/.test(url)) return res
    var graph = await res.clone().json()
    var saved = (graph.qParams && graph.qParams.supernodes) || []
    if (saved.length && !new URL(window.location).searchParams.has('supernodes')) {
      setParam('supernodes', JSON.stringify(saved))
    }
    showStale(graph.annotations)
    return res
  }

  document.addEventListener('change', function (ev) {
    if (!ev.target.matches || !ev.target.matches('select.graph-prompt-select')) return
    setParam('pinnedIds', null)
    setParam('supernodes', null)
  }, true)
})()
