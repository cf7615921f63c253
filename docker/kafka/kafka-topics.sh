#!/bin/bash
# kafka-topics.sh as in the Apache Kafka distribution.
exec java -Xmx256m -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties \
  -cp '/opt/kafka/libs/*' org.apache.kafka.tools.TopicCommand "$@"
