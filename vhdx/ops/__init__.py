"""ops/ is what you do: one room per README verb; it may use chains/, file/ and format/, never cli/.

create (create, snapshot), reparent, orphans, check, maps (map, diff), export (export, hash),
demo, and merge/ (plan, journal, run). Each room is a library call that returns values and
raises :class:`vhdx.VhdxError`; none prints (progress goes to a callback).
"""
