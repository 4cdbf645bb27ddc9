from collections.abc import Mapping

from dify_plugin import Endpoint
from werkzeug import Request, Response

from llamaindex_kb import handle_plugin_request


class RetrievalEndpoint(Endpoint):
    """Dify's External Knowledge API, POST /retrieval: answered by the core."""

    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        return handle_plugin_request(r, settings, self.session)
