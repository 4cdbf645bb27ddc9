from collections.abc import Mapping

from dify_plugin import Endpoint
from werkzeug import Request, Response

from llamaindex_kb import handle_plugin_request


class KnowledgeEndpoint(Endpoint):
    """Every route of the plugin (one YAML each in endpoints/): answered by the core, which
    routes, authenticates and renders the same way as the standalone server."""

    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        return handle_plugin_request(r, settings, self.session)
