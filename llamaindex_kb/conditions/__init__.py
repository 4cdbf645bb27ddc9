"""Dify's ``metadata_condition``: one home per part.

* ``values``: the text and numeric forms of a metadata value that conditions compare;
* ``model``: the request's ``MetadataCondition``, parsed and checked
  (``parse_metadata_condition``), reduced to ``Check``s;
* ``compiled``: ``compile_condition`` → ``Predicate``, compiled once per request:
  ``matches`` (the reference evaluator), ``mask`` (over a ``MetadataTable``) and
  ``exact_part`` (what a store may push down, translated by each store itself);
* ``table``: ``MetadataTable``, the embedded store's metadata as columns.
"""
