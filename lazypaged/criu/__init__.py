"""CRIU support: lazypaged as the lazy-pages daemon of ``criu restore --lazy-pages``.

* ``images``/``protobuf``: reading pstree, pagemap (4.1 and 4.2+ layouts) and
  mm images; lazy ranges split at VMA boundaries.
* ``records``: the lazy-pages socket protocol (task records, end marker).
* ``pageserver``/``remote``: client of CRIU's own page server, pipelined.
* ``server``: the lazy-pages socket, one run per restore, the ``[criu]`` listener.
* ``keeper``: makes a daemon crash kill unfinished targets instead of zero-filling them.
* ``cli``: ``lazypaged criu-lazy-pages``.
"""
