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
//    instead of leaving this machine;
// 5. a panel lists the graph's suggested supernodes (`metadata.supernode_suggestions`,
//    pipeline/supernodes.py) with Accept / Reject. The decisions live in the URL's
//    `suggestions` ({id: "accepted" | "rejected"}, from the saved `qParams.suggestions` when the
//    URL has none), and Save posts them with the page's own qParams. Accept appends
//    [name, ...members] to the URL's supernodes, pins the members and reloads the page (it reads
//    supernodes from the URL only when it starts), which then shows the group for the user to
//    edit with its own tools; Reject hides the suggestion.
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

  function getJsonParam(key, fallback) {
    var value = new URL(window.location).searchParams.get(key)
    try { return value ? JSON.parse(value) : fallback } catch (e) { return fallback }
  }

  function decide(suggestion, state) {
    var states = getJsonParam('suggestions', {})
    states[suggestion.id] = state
    setParam('suggestions', JSON.stringify(states))
    if (state != 'accepted') return showSuggestions(suggestionList)
    var supernodes = getJsonParam('supernodes', [])
    var key = suggestion.members.slice().sort().join(',')
    if (!supernodes.some(function (s) { return s.slice(1).sort().join(',') == key })) {
      supernodes.push([suggestion.name].concat(suggestion.members))
      setParam('supernodes', JSON.stringify(supernodes))
    }
    var pinned = (new URL(window.location).searchParams.get('pinnedIds') || '').split(',').filter(Boolean)
    suggestion.members.forEach(function (id) { if (pinned.indexOf(id) < 0) pinned.push(id) })
    setParam('pinnedIds', pinned.join(','))
    window.location.reload()
  }

  var suggestionList = []

  function showSuggestions(suggestions) {
    var old = document.querySelector('.clt-suggestions')
    if (old) old.remove()
    var states = getJsonParam('suggestions', {})
    var open = suggestions.filter(function (s) { return states[s.id] != 'rejected' })
    if (!open.length) return
    var panel = document.createElement('div')
    panel.className = 'clt-suggestions'
    panel.style.cssText = 'position:fixed;right:8px;bottom:40px;z-index:10000;width:280px;max-height:40vh;' +
      'overflow:auto;padding:6px 8px;background:#fff;border:1px solid #bbb;border-radius:4px;' +
      'box-shadow:0 1px 4px rgba(0,0,0,.2);font:12px sans-serif'
    var title = document.createElement('div')
    title.textContent = 'Suggested supernodes (' + open.length + ')'
    title.style.cssText = 'font-weight:bold;margin-bottom:4px'
    panel.appendChild(title)
    open.forEach(function (s) {
      var row = document.createElement('div')
      row.className = 'clt-suggestion'
      row.dataset.id = s.id
      row.title = s.members.join(', ') + ' (similarity ' + s.similarity + ')'
      row.style.cssText = 'display:flex;gap:4px;align-items:center;margin:2px 0'
      var name = document.createElement('span')
      name.textContent = s.name + ' \u00d7' + s.members.length
      name.style.cssText = 'flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap'
      row.appendChild(name)
      if (states[s.id] == 'accepted') {
        var done = document.createElement('span')
        done.textContent = 'accepted'
        done.style.color = '#4a8c2a'
        row.appendChild(done)
      } else {
        [['Accept', 'accepted'], ['Reject', 'rejected']].forEach(function (b) {
          var button = document.createElement('button')
          button.textContent = b[0]
          button.className = 'clt-' + b[1]
          button.onclick = function () { decide(s, b[1]) }
          row.appendChild(button)
        })
      }
      panel.appendChild(row)
    })
    document.body.appendChild(panel)
  }

  function withSuggestions(init) {
    var states = new URL(window.location).searchParams.get('suggestions')
    if (!states || !init || typeof init.body != 'string') return init
    try {
      var body = JSON.parse(init.body)
      body.qParams = Object.assign({}, body.qParams, {suggestions: states})
      return Object.assign({}, init, {body: JSON.stringify(body)})
    } catch (e) { return init }
  }

  window.fetch = async function (input, init) {
    var url = typeof input == 'string' ? input : input.url
    if (new URL(url, window.location.href).origin != window.location.origin) {
      throw new TypeError('clt serve: ' + url + ' is not on this server, and the page loads nothing from elsewhere')
    }
    if (/(^|\/)save_graph\//.test(url)) return pageFetch.call(this, input, withSuggestions(init))
    var res = await pageFetch.apply(this, arguments)
    if (!res.ok || !/(^|\/)graph_data\/[^/?]+\.json/.test(url)) return res
    var graph = await res.clone().json()
    var saved = (graph.qParams && graph.qParams.supernodes) || []
    if (saved.length && !new URL(window.location).searchParams.has('supernodes')) {
      setParam('supernodes', JSON.stringify(saved))
    }
    var states = graph.qParams && graph.qParams.suggestions
    if (states && !new URL(window.location).searchParams.has('suggestions')) {
      setParam('suggestions', JSON.stringify(states))
    }
    showStale(graph.annotations)
    suggestionList = (graph.metadata && graph.metadata.supernode_suggestions) || []
    showSuggestions(suggestionList)
    return res
  }

  document.addEventListener('change', function (ev) {
    if (!ev.target.matches || !ev.target.matches('select.graph-prompt-select')) return
    setParam('pinnedIds', null)
    setParam('supernodes', null)
    setParam('suggestions', null)
  }, true)
})()
