# -*- coding: utf-8 -*-
"""Runs one Ghost 19.08 job with Ghost's own worker code (Python 2.7), as an RQ worker would.

Run by the test runtime's python2.7 (scripts/build-ghost-runtime) with a copy of Ghost's patched
tree as the working directory (tests/support/ghost_worker.py):

    python2.7 ghost_driver.py run JOB_ID          exit 0 when Ghost's job body returned, 1 when it raised
    python2.7 ghost_driver.py insert apps|jobs    a JSON document on stdin (bson.json_util), written
                                                  as Ghost's API writes it; prints the new id

Only what needs AWS, Redis or SSH is replaced, each after the step the tests look at:
- S3 (`settings.cloud_connections['aws']`): a bucket on local disk ($GHOST_TEST_S3_DIR);
- `Deploy._deploy_module` / `Redeploy._deploy_module`: EC2 discovery and fabric SSH to instances;
- `AWSImageBuilder.start_builder` and `purge_old_images` (Packer, AMIs) and
  `create_userdata_launchconfig_update_asg` (autoscaling): a fixed AMI, after writing the job's Packer
  definition where Ghost writes it and standing $GHOST_TEST_PACKER_SECONDS in for Packer's run;
- `command.get_current_job` (Redis): an object whose id is the job id, as `run.py` enqueues it.
The clone, buildpacks, packaging, manifest and status writes run as Ghost's own code.
"""

import hashlib
import json
import os
import shutil
import sys
import traceback
import urllib
from datetime import datetime

# Ghost's modules from its tree (the working directory), not this file's directory.
sys.path[0] = os.getcwd()

FAKE_AMI_ID = 'ami-0123abcd'
STANDS_IN = 'ghost_driver (test harness): '


class LocalKey(object):
    """An S3 key of LocalBucket: one file, its name the quoted key (S3 keys are not paths)."""

    def __init__(self, bucket, name):
        self.bucket = bucket
        self.name = name

    def _path(self):
        return os.path.join(self.bucket.root, urllib.quote(self.name, safe=''))

    def exists(self):
        return os.path.isfile(self._path())

    def set_contents_from_string(self, data, *args, **kwargs):
        with open(self._path(), 'wb') as out:
            out.write(data.encode('utf-8') if isinstance(data, unicode) else data)

    def set_contents_from_filename(self, filename, *args, **kwargs):
        shutil.copyfile(filename, self._path())

    def get_contents_as_string(self, *args, **kwargs):
        with open(self._path(), 'rb') as source:
            return source.read()

    def get_contents_to_filename(self, filename, *args, **kwargs):
        shutil.copyfile(self._path(), filename)

    def copy(self, bucket, key_path, *args, **kwargs):
        key = bucket.new_key(key_path)
        key.set_contents_from_filename(self._path())
        return key

    def delete(self):
        os.remove(self._path())

    def close(self, *args, **kwargs):
        pass


class LocalBucket(object):
    def __init__(self, name):
        self.name = name
        self.root = os.path.join(os.environ['GHOST_TEST_S3_DIR'], name)
        if not os.path.isdir(self.root):
            os.makedirs(self.root)

    def new_key(self, name):
        return LocalKey(self, name)

    def get_key(self, name, *args, **kwargs):
        key = LocalKey(self, name)
        return key if key.exists() else None

    def delete_key(self, name, *args, **kwargs):
        key = self.get_key(name)
        if key:
            key.delete()

    def list(self, prefix='', *args, **kwargs):
        names = sorted(urllib.unquote(entry) for entry in os.listdir(self.root))
        return [LocalKey(self, name) for name in names if name.startswith(prefix)]


class LocalS3Connection(object):
    def get_bucket(self, name, *args, **kwargs):
        return LocalBucket(name)


class LocalCloudConnection(object):
    """Stands for botosts' AWSConnection: S3 on local disk; any other AWS service is refused."""

    def __init__(self, *args, **kwargs):
        pass

    def get_connection(self, region, services, *args, **kwargs):
        if list(services) != ['s3'] or kwargs.get('boto_version', 'boto') != 'boto':
            raise RuntimeError(STANDS_IN + 'no AWS here, asked for %r %r' % (services, kwargs))
        return LocalS3Connection()


class CurrentJob(object):
    """What rq's get_current_job gives Ghost's job body: run.py enqueues with job_id = the MongoDB id."""

    def __init__(self, job_id):
        self.id = job_id


def replace(owner, name, value):
    """Replace an attribute Ghost 19.08 has: a name it no longer has fails the run instead of being added."""
    if not hasattr(owner, name):
        raise AttributeError(STANDS_IN + '%r has no %r to replace' % (owner, name))
    setattr(owner, name, value)


def replace_what_needs_aws_redis_or_ssh(job_id):
    import command
    import settings
    import ghost_aws
    from commands import buildimage, deploy, redeploy
    from libs.builders.image_builder_aws import AWSImageBuilder

    if 'aws' not in settings.cloud_connections:
        raise KeyError(STANDS_IN + "settings.cloud_connections has no 'aws'")
    settings.cloud_connections['aws'] = LocalCloudConnection  # the dict every Ghost module imported
    replace(command, 'get_current_job', lambda *args, **kwargs: CurrentJob(job_id))

    def deploy_module(self, module, fabric_execution_strategy, safe_deployment_strategy):
        from ghost_log import log
        log(STANDS_IN + 'module %s not sent to instances (EC2 discovery and SSH)' % module['name'], self._log_file)

    replace(deploy.Deploy, '_deploy_module', deploy_module)
    replace(redeploy.Redeploy, '_deploy_module', deploy_module)

    def start_builder(self):
        import time
        from ghost_log import log
        # As Ghost's own: the definition is written once the provisioner trees exist, then Packer runs.
        with open(self._packer_file_path_aws, 'w') as stream:
            stream.write(json.dumps({'builders': [], 'provisioners': []}))
        seconds = float(os.environ.get('GHOST_TEST_PACKER_SECONDS') or 0)
        log(STANDS_IN + 'no Packer run (%gs in its place), AMI %s' % (seconds, FAKE_AMI_ID), self._log_file)
        time.sleep(seconds)
        return FAKE_AMI_ID, self._ami_name

    replace(AWSImageBuilder, 'start_builder', start_builder)
    replace(AWSImageBuilder, 'purge_old_images', lambda self: True)

    def update_asg(ami_id, cloud_connection, app, config, log_file, update_as_params=False):
        from ghost_log import log
        log(STANDS_IN + 'autoscaling group %s not updated to %s' % (app['autoscale']['name'], ami_id), log_file)
        return True

    # commands.buildimage imported the function by name: replaced where it is called from.
    replace(buildimage, 'create_userdata_launchconfig_update_asg', update_asg)
    replace(ghost_aws, 'create_userdata_launchconfig_update_asg', update_asg)


def run(job_id):
    """Ghost's RQ job body under rq 0.12's own job timeout, as its worker runs it."""
    replace_what_needs_aws_redis_or_ssh(job_id)
    import command
    import settings
    from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

    try:
        with UnixSignalDeathPenalty(settings.RQ_JOB_TIMEOUT, JobTimeoutException):
            command.Command().execute(job_id)
        return 0
    except Exception:
        # Ghost's Command points sys.stdout and sys.stderr at the job log and closes it.
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        traceback.print_exc()
        return 1
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def insert(collection, document):
    """What Ghost's API (run.py pre_insert_app / pre_insert_job, then Eve) stores for a POST."""
    from bson.objectid import ObjectId
    from ghost_api import ALL_COMMAND_FIELDS, ghost_api_app_data_input_validator
    from ghost_aws import normalize_application_tags
    from ghost_data import get_fresh_connection

    user = document.pop('_api_user', 'tester')
    if collection == 'apps':
        document['modules'] = document.get('modules', [])
        document['environment_infos'] = document.get('environment_infos', {})
        document['environment_infos']['instance_tags'] = normalize_application_tags(document, document)
        ghost_api_app_data_input_validator(document)
        for module in document['modules']:
            module['initialized'] = False
        document['pending_changes'] = [
            {'field': name, 'user': user, 'updated': datetime.utcnow()} for name in ALL_COMMAND_FIELDS]
        document['user'] = user
    elif collection == 'jobs':
        document['app_id'] = ObjectId(document['app_id'])
        document.setdefault('instance_type', 't2.micro')  # Eve's schema default (models/jobs.py)
        for module in document.get('modules', []):
            module.setdefault('rev', 'HEAD')
        document['user'] = user
        document['status'] = 'init'
        document['message'] = 'Initializing job'
    else:
        raise ValueError('not a collection Ghost posts to here: %r' % collection)
    # Eve's own fields: second precision, as Eve stores them.
    now = datetime.utcnow().replace(microsecond=0)
    document['_created'] = document['_updated'] = now
    document['_etag'] = eve_etag(document)
    return get_fresh_connection()[collection].insert_one(document).inserted_id


def eve_etag(document):
    """Eve's document_etag without a Flask app: sha1 of the sorted JSON, dates as Eve encodes them."""
    from eve.utils import date_to_rfc1123

    def encode(value):
        return date_to_rfc1123(value) if isinstance(value, datetime) else str(value)

    return hashlib.sha1(json.dumps(document, sort_keys=True, default=encode).encode('utf-8')).hexdigest()


def main(argv):
    if len(argv) == 3 and argv[1] == 'run':
        return run(argv[2])
    if len(argv) == 3 and argv[1] == 'insert':
        from bson import json_util
        print(str(insert(argv[2], json_util.loads(sys.stdin.read()))))
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv))
