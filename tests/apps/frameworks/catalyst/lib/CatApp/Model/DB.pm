package CatApp::Model::DB;
use strict;
use warnings;
use base 'Catalyst::Model::DBIC::Schema';

1;
