"""HTTP routes. Thin: parse the request, call a service, shape the response."""
