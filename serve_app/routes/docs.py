"""GET /docs (Swagger UI) and GET /redoc (ReDoc), with every asset served by metergate itself.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without internet
/docs is blank. These pages load the files that the pinned `fastapi-offline` package ships
(see pyproject.toml), from /docs/assets/. Nothing else is fetched: no web fonts, and Swagger
UI's online validator is off. The Content-Security-Policy says so to the browser as well.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse

from serve_app.context import Context
from serve_app.errors import ApiError

ASSETS = {  # the files served, and their types: nothing else of the package is reachable
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
ASSET_CACHE_S = 86_400
OPENAPI_PATH = "/openapi.json"
DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
               "frame-ancestors 'none'")


def routes(ctx: Context) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    folder = files("fastapi_offline").joinpath("static")
    missing = [name for name in ASSETS if not folder.joinpath(name).is_file()]
    assert not missing, f"fastapi-offline ships no {missing}: is the pinned version installed?"

    def page(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = DOCS_POLICY
        response.headers["Cache-Control"] = "no-cache"
        return response

    @router.get("/docs")
    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return page(get_swagger_ui_html(
            openapi_url=f"{root}{OPENAPI_PATH}", title="metergate API",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon.png",
            swagger_ui_parameters={"validatorUrl": None}))

    @router.get("/redoc")
    async def redoc(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return page(get_redoc_html(
            openapi_url=f"{root}{OPENAPI_PATH}", title="metergate API",
            redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
            redoc_favicon_url=f"{root}/docs/assets/favicon.png", with_google_fonts=False))

    @router.get("/docs/assets/{name}")
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise ApiError(404, "not_found", f"no asset {name}")
        return FileResponse(str(folder.joinpath(name)), media_type=media_type,
                            headers={"Cache-Control": f"public, max-age={ASSET_CACHE_S}"})

    return router
