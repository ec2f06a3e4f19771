"""Config wing: gateway.yaml (`settings`), IdP profiles (`profiles`), strict YAML loading with
`file: key: message` errors (`yamlfile`), and where the shipped files live (`bundled`).
The bottom of the house: imports nothing else of the gateway.
"""
