"""The control plane's one shape check (``daemon._shapes``): botocore's SageMaker input shapes, in process.

The black-box side (every malformed call answered as a clean 4xx by a running daemon) is in test_fuzz.py;
these pin the messages and the deliberate departures from the model.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdmaker.errors import ControlPlaneError
from sdmaker.serving.daemon._shapes import check_input

_VARIANT = {"VariantName": "v", "ModelName": "m", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large",
            "InitialVariantWeight": 1.0}


def _refusal(operation: str, body: dict[str, Any]) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as info:
        check_input(operation, body)
    assert 400 <= info.value.status < 500
    return info.value


@pytest.mark.parametrize(("operation", "body", "code", "text"), [
    ("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": ["x"]}, "SerializationException",
     "STRING_VALUE can not be converted to a structure (at 'productionVariants.1.member')"),
    ("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": [None]}, "ValidationException",
     "Value null at 'productionVariants.1.member' failed to satisfy constraint: Member must not be null"),
    ("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": [{"VariantName": "v", "ModelName": ["a"]}]},
     "SerializationException", "at 'productionVariants.1.member.modelName'"),
    ("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": [[]]}, "SerializationException",
     "Start of list can not be converted to a structure"),
    ("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": []}, "ValidationException",
     "Member must have length greater than or equal to 1"),
    ("ListEndpoints", {"MaxResults": "x"}, "SerializationException", "STRING_VALUE can not be converted to an Integer"),
    ("ListEndpoints", {"MaxResults": True}, "SerializationException", "at 'maxResults'"),
    ("ListEndpoints", {"MaxResults": 1.5}, "SerializationException", "at 'maxResults'"),
    ("ListEndpoints", {"MaxResults": -1}, "ValidationException",
     "Value '-1' at 'maxResults' failed to satisfy constraint: Member must have value greater than or equal to 1"),
    ("ListEndpoints", {"MaxResults": 10**9}, "ValidationException", "less than or equal to 100"),
    ("ListEndpoints", {"SortBy": []}, "SerializationException", "at 'sortBy'"),
    ("ListEndpoints", {"SortBy": "Size"}, "ValidationException", "Member must satisfy enum value set"),
    ("ListEndpoints", {"SortOrder": 1}, "SerializationException", "at 'sortOrder'"),
    ("ListEndpoints", {"NameContains": {}}, "SerializationException", "at 'nameContains'"),
    ("CreateModel", {"ModelName": "m", "ExecutionRoleArn": []}, "SerializationException", "at 'executionRoleArn'"),
    ("CreateModel", {"ModelName": "a_b"}, "ValidationException", "Member must satisfy regular expression pattern"),
    ("CreateModel", {"ModelName": "m", "PrimaryContainer": {"Environment": [1]}}, "SerializationException",
     "at 'primaryContainer.environment'"),
    ("DescribeEndpoint", {}, "ValidationException", "Value null at 'endpointName'"),
    ("DescribeEndpoint", {"EndpointName": "\ud800"}, "ValidationException", "Value '\\ud800' at 'endpointName'"),
    ("DeleteModel", {"ModelName": "x" * 64}, "ValidationException", "Member must have length less than or equal to 63"),
    ("ListEndpoints", {"x": json.loads("[" * 200 + "]" * 200)}, "SerializationException", "nested too deeply"),
])
def test_malformed_members_are_refused_naming_the_member(operation: str, body: dict[str, Any], code: str,
                                                         text: str) -> None:
    error = _refusal(operation, body)
    assert error.aws_code == code
    assert text in error.message
    error.message.encode("utf-8")  # renders: a lone surrogate is quoted as an escape


def test_valid_calls_and_sdmakers_deliberate_departures_pass() -> None:
    # a local ModelDataUrl, a made-up role ARN and the SageMaker SDK's local instance type are sdmaker's to take
    check_input("CreateModel", {"ModelName": "m", "ExecutionRoleArn": "arn:aws:iam::1:role/r", "PrimaryContainer": {
        "Image": "i", "ModelDataUrl": "/tmp/model", "Environment": {"A": "b"}}, "Tags": [{"Key": "k", "Value": "v"}]})
    check_input("CreateEndpointConfig", {"EndpointConfigName": "c", "ProductionVariants": [
        {**_VARIANT, "InstanceType": "local"}]})
    check_input("ListEndpoints", {"MaxResults": 10, "SortBy": "Name", "SortOrder": "Ascending", "NameContains": "x",
                                  "StatusEquals": "InService", "NextToken": "10", "Unknown": {"a": 1}})
    check_input("ListEndpoints", {"MaxResults": None})  # JSON null is an absent member


def test_quoted_values_are_short() -> None:
    error = _refusal("DescribeEndpoint", {"EndpointName": "x" * 100_000})
    assert len(error.message) < 400
