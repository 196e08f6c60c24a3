// Our stand-in for the d3-jetpack fork that circuit-tracer 0.5.0's frontend loads from a CDN
// (`static_js/lib/jetpack_2024-07-20.js`). It adds to d3 v7 exactly what that page uses, with
// the semantics of d3-jetpack 2.x (github.com/gka/d3-jetpack), written against d3 v7's API
// (listeners get `(event, d)`; there is no d3.nest). Loaded after d3, before the page's scripts.
;(function (d3) {
  'use strict'
  var proto = d3.selection.prototype

  // 'div.a.b#c' -> {tag: 'div', class: 'a b', id: 'c'}
  function parseTag(name) {
    var parts = name.split(/([.#])/g)
    var out = {tag: parts.shift(), class: null, id: null}
    while (parts.length) {
      var sep = parts.shift()
      var value = parts.shift()
      if (sep == '.') out.class = out.class ? out.class + ' ' + value : value
      else out.id = value
    }
    return out
  }

  function setTagAttrs(sel, n) {
    if (n.class) sel.attr('class', n.class)
    if (n.id) sel.attr('id', n.id)
    return sel
  }

  // selection.append('tag.class#id'): d3's append, then the class and id of the shorthand
  var d3Append = proto.append
  proto.append = function (name) {
    if (typeof name != 'string') return d3Append.call(this, name)
    var n = parseTag(name)
    return setTagAttrs(d3Append.call(this, n.tag), n)
  }

  // selection.appendMany(tag, data): one new `tag` per datum
  proto.appendMany = function (name, data) {
    return this.selectAll(null).data(data).enter().append(name)
  }

  // selection.selectAppend('tag.class'): each element's first descendant matching it, or a
  // new child if it has none
  proto.selectAppend = function (name) {
    return this.select(function () {
      return this.querySelector(name) || d3.select(this).append(name).node()
    })
  }

  // selection.at({fooBar: v}): attributes, camelCase keys as kebab-case (but SVG's own camelCase
  // attributes such as viewBox stay); at(name) reads, at(name, value) writes
  var camelCaseAttrs = /^(allowReorder|attributeName|attributeType|autoReverse|baseFrequency|baseProfile|calcMode|clipPathUnits|diffuseConstant|edgeMode|filterUnits|glyphRef|gradientTransform|gradientUnits|kernelMatrix|kernelUnitLength|keyPoints|keySplines|keyTimes|lengthAdjust|limitingConeAngle|markerHeight|markerUnits|markerWidth|maskContentUnits|maskUnits|numOctaves|pathLength|patternContentUnits|patternTransform|patternUnits|pointsAtX|pointsAtY|pointsAtZ|preserveAlpha|preserveAspectRatio|primitiveUnits|refX|refY|repeatCount|repeatDur|requiredExtensions|requiredFeatures|specularConstant|specularExponent|spreadMethod|startOffset|stdDeviation|stitchTiles|surfaceScale|systemLanguage|tableValues|targetX|targetY|textLength|viewBox|viewTarget|xChannelSelector|yChannelSelector|zoomAndPan)$/
  function kebab(key) {
    return key.replace(/([a-z\d])([A-Z])/g, '$1-$2').toLowerCase()
  }
  proto.at = function (name, value) {
    if (typeof name == 'object') {
      for (var key in name) this.attr(camelCaseAttrs.test(key) ? key : kebab(key), name[key])
      return this
    }
    return arguments.length == 1 ? this.attr(name) : this.attr(name, value)
  }

  // selection.st({fooBar: v}): styles, camelCase keys as kebab-case, numbers given to a length
  // property get 'px'; st(name) reads, st(name, value) writes
  var pxStyles = new Set(('top left bottom right width height min-width max-width min-height max-height ' +
    'margin margin-top margin-right margin-bottom margin-left padding padding-top padding-right ' +
    'padding-bottom padding-left border border-top border-right border-bottom border-left border-width ' +
    'border-top-width border-right-width border-bottom-width border-left-width border-radius ' +
    'font-size line-height stroke-width').split(' '))
  function withPx(value) {
    return typeof value == 'number' ? value + 'px' : value
  }
  function addStyle(sel, style, value) {
    style = kebab(style)
    if (!pxStyles.has(style)) return sel.style(style, value)
    return sel.style(style, typeof value == 'function'
      ? function () { return withPx(value.apply(this, arguments)) }
      : withPx(value))
  }
  proto.st = function (name, value) {
    if (typeof name == 'object') {
      for (var key in name) addStyle(this, key, name[key])
      return this
    }
    return arguments.length == 1 ? this.style(name) : addStyle(this, name, value)
  }

  // selection.translate([x, y] or fn): an SVG transform attribute, or a CSS transform on HTML;
  // translate(v, 0) is [v, 0] and translate(v, 1) is [0, v]
  proto.translate = function (xy, dim) {
    var node = this.node()
    if (!node) return this
    function point(d, i) {
      var p = typeof xy == 'function' ? xy.call(this, d, i) : xy
      return dim === 0 ? [p, 0] : dim === 1 ? [0, p] : p
    }
    if (node.getBBox) {
      return this.attr('transform', function (d, i) {
        var p = point.call(this, d, i)
        return 'translate(' + p[0] + ',' + p[1] + ')'
      })
    }
    return this.style('transform', function (d, i) {
      var p = point.call(this, d, i)
      return 'translate(' + p[0] + 'px,' + p[1] + 'px)'
    })
  }

  // selection.parent(): the distinct parents of the selected elements
  proto.parent = function () {
    var parents = []
    return this.filter(function () {
      if (parents.indexOf(this.parentNode) > -1) return false
      parents.push(this.parentNode)
      return true
    }).select(function () { return this.parentNode })
  }

  // d3.clamp(min, x, max)
  d3.clamp = function (min, x, max) {
    return Math.max(min, Math.min(max, x))
  }

  // d3.nestBy(array, key): arrays of the items with the same String(key(d)), in order of first
  // appearance, each with its `key`
  d3.nestBy = function (array, key) {
    var groups = new Map()
    Array.from(array).forEach(function (d) {
      var k = key(d) + ''
      if (!groups.has(k)) {
        var group = []
        group.key = k
        groups.set(k, group)
      }
      groups.get(k).push(d)
    })
    return Array.from(groups.values())
  }

  // d3.conventions({sel, margin, layers, ...}): a chart of `layers` stacked in `sel`, each layer
  // absolutely positioned over the others: 's' an SVG `g` translated by the margin (c.svg is the
  // first), 'c' a canvas 2-D context scaled to the device pixel ratio and translated by the
  // margin, 'd' a div placed at the margin. Sizes come from `sel` (960 x 500 without one); c.x,
  // c.y are linear scales over the inner width and height, c.drawAxis(svg = c.svg) draws
  // c.xAxis and c.yAxis as `g.x.axis` and `g.y.axis`.
  d3.conventions = function (c) {
    c = c || {}
    c.margin = c.margin || {}
    ;['top', 'right', 'bottom', 'left'].forEach(function (side) {
      if (!c.margin[side] && c.margin[side] !== 0) c.margin[side] = 20
    })
    if (c.parentSel) c.sel = c.parentSel
    var node = c.sel && c.sel.node()
    c.totalWidth = c.totalWidth || (node && node.offsetWidth) || 960
    c.totalHeight = c.totalHeight || (node && node.offsetHeight) || 500
    c.width = c.width || c.totalWidth - c.margin.left - c.margin.right
    c.height = c.height || c.totalHeight - c.margin.top - c.margin.bottom
    c.totalWidth = c.width + c.margin.left + c.margin.right
    c.totalHeight = c.height + c.margin.top + c.margin.bottom

    c.sel = c.sel || d3.select('body')
    c.sel.st({position: 'relative', height: c.totalHeight, width: c.totalWidth})

    c.x = c.x || d3.scaleLinear().range([0, c.width])
    c.y = c.y || d3.scaleLinear().range([c.height, 0])
    c.xAxis = c.xAxis || d3.axisBottom(c.x)
    c.yAxis = c.yAxis || d3.axisLeft(c.y)

    var stacked = !!c.layers
    c.layers = (c.layers || 's').split('').map(function (type) {
      if (type == 's') {
        var layer = c.sel.append('svg')
          .st({position: stacked ? 'absolute' : ''})
          .attr('width', c.totalWidth)
          .attr('height', c.totalHeight)
          .append('g')
          .attr('transform', 'translate(' + c.margin.left + ',' + c.margin.top + ')')
        if (!c.svg) c.svg = layer
        return layer
      }
      if (type == 'c') {
        var s = window.devicePixelRatio || 1
        var ctx = c.sel.append('canvas')
          .at({width: c.totalWidth * s, height: c.totalHeight * s})
          .st({width: c.totalWidth, height: c.totalHeight, position: 'absolute'})
          .node().getContext('2d')
        ctx.scale(s, s)
        ctx.translate(c.margin.left, c.margin.top)
        return ctx
      }
      if (type == 'd') {
        return c.sel.append('div').st({
          position: 'absolute', left: c.margin.left, top: c.margin.top, width: c.width, height: c.height,
        })
      }
      throw new Error('d3.conventions: unknown layer type ' + JSON.stringify(type) + ' (use s, c or d)')
    })

    c.drawAxis = function (svg) {
      svg = svg || c.svg
      var xAxisSel = svg.append('g').attr('class', 'x axis')
        .attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis)
      var yAxisSel = svg.append('g').attr('class', 'y axis').call(c.yAxis)
      return {xAxisSel: xAxisSel, yAxisSel: yAxisSel}
    }
    return c
  }

  // selection.call(d3.attachTooltip, tooltipSel = d3.select('.tooltip'), fieldFns): show
  // `tooltipSel` near the pointer while it is over an element, filled with fieldFns(d) (default:
  // every plain field of the first datum), and hide it on mouseout
  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return
    tooltipSel = tooltipSel || d3.select('.tooltip')
    var first = sel.datum()
    fieldFns = fieldFns || Object.keys(first)
      .filter(function (k) { return typeof first[k] != 'object' })
      .map(function (k) { return function (d) { return k + ': <b>' + d[k] + '</b>' } })

    sel
      .on('mouseover.attachTooltip', function (ev, d) {
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fieldFns).html(function (fn) { return fn(d) })
        d3.select(this).classed('tooltipped', true)
      })
      .on('mousemove.attachTooltip', function (ev) {
        if (!tooltipSel.size()) return
        var bb = tooltipSel.node().getBoundingClientRect()
        var left = d3.clamp(20, ev.clientX - bb.width / 2, window.innerWidth - bb.width - 20)
        var top = window.innerHeight > ev.clientY + 20 + bb.height ? ev.clientY + 20 : ev.clientY - bb.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
        d3.selectAll('.tooltipped').classed('tooltipped', false)
      })
  }
})(window.d3)
