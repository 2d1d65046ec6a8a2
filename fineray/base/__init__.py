"""The ground floor every component stands on: storage URIs and atomic writes (`storage`), starting or joining
Ray (`connect`), run names and kinds (`runs`), lazy package exports (`lazy`).

Nothing here imports another fineray package; everything else may import it. Import the modules directly
(`from fineray.base import storage`).
"""
